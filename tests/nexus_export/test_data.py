"""Text sources and token windows, with the byte-level tokenizer of tiny-llama (one token per byte, fast)."""

import re
from pathlib import Path

import pytest
import torch

from nexus_export.data import calibration_windows, evaluation_windows, load_text
from nexus_export.data.sources import mix_counts, parse_mix
from nexus_export.errors import UserError
from nexus_export.models.zoo import byte_level_tokenizer

AUSTEN = Path(__file__).resolve().parents[3] / "shared" / "data" / "corpora" / "austen"
CALIBRATION_BOOKS = ["prideprejudice", "sensesensibility", "mansfieldpark", "northangerabbey"]
EVALUATION_BOOKS = ["emma", "persuasion"]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.mark.parametrize("split, books", [("calibration", CALIBRATION_BOOKS), ("evaluation", EVALUATION_BOOKS)])
def test_vendored_austen_matches_the_originals(split, books):
    if not AUSTEN.is_dir():
        pytest.skip(f"the original corpus is not at {AUSTEN}")
    joined = b"\n\n".join((AUSTEN / f"{book}.txt").read_bytes() for book in books)
    assert load_text("austen", split).encode("utf-8") == joined


def test_austen_splits_are_the_right_books():
    calibration = load_text()
    evaluation = load_text("austen", "evaluation")
    assert calibration.startswith("PRIDE AND PREJUDICE")
    assert evaluation.startswith("EMMA")
    assert "\n\nPersuasion\n\n\nby\n\nJane Austen\n\n(1818)" in evaluation
    for title in ("SENSE AND SENSIBILITY", "MANSFIELD PARK", "NORTHANGER ABBEY"):
        assert f"\n\n{title}\n" in calibration and title not in evaluation
    assert 2_500_000 < len(calibration) < 2_800_000 and 1_300_000 < len(evaluation) < 1_400_000


def test_calibration_windows_follow_the_protocol(tokenizer):
    windows = calibration_windows(tokenizer, n=8, seq_len=64, seed=3)
    assert windows.shape == (8, 64) and windows.dtype == torch.long
    stream = list(load_text("austen", "calibration").encode("utf-8"))  # byte-level: one token per byte
    offsets = torch.randint(0, len(stream) - 64, (8,), generator=torch.Generator().manual_seed(3)).tolist()
    assert windows.tolist() == [stream[o : o + 64] for o in offsets]


def test_calibration_windows_are_deterministic_per_seed(tokenizer):
    first = calibration_windows(tokenizer, n=4, seq_len=32, seed=0)
    assert torch.equal(first, calibration_windows(tokenizer, n=4, seq_len=32, seed=0))
    assert not torch.equal(first, calibration_windows(tokenizer, n=4, seq_len=32, seed=1))


def test_evaluation_windows_are_the_first_consecutive_tokens(tokenizer):
    windows = evaluation_windows(tokenizer, n=4, seq_len=32)
    assert windows.shape == (4, 32) and windows.dtype == torch.long
    first_bytes = list(load_text("austen", "evaluation").encode("utf-8")[: 4 * 32])
    assert windows[0].tolist() == first_bytes[:32]
    assert windows.reshape(-1).tolist() == first_bytes


def test_changing_returned_windows_does_not_change_the_cache(tokenizer):
    windows = evaluation_windows(tokenizer, n=2, seq_len=16)
    expected = windows.clone()
    windows.zero_()
    assert torch.equal(evaluation_windows(tokenizer, n=2, seq_len=16), expected)


def test_a_local_file_serves_both_splits(tmp_path, tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("Ünïcode and plain text. " * 40, encoding="utf-8")
    assert load_text(str(path), "calibration") == load_text(path, "evaluation") == path.read_text(encoding="utf-8")
    windows = evaluation_windows(tokenizer, source=str(path), n=3, seq_len=50)
    assert windows.reshape(-1).tolist() == list(path.read_bytes()[:150])


def test_a_folder_is_split_by_file_names(tmp_path):
    (tmp_path / "b_train.txt").write_text("train two", encoding="utf-8")
    (tmp_path / "a_calib.txt").write_text("calib one", encoding="utf-8")
    (tmp_path / "eval.txt").write_text("held out", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not text", encoding="utf-8")
    assert load_text(tmp_path, "calibration") == "calib one\n\ntrain two"
    assert load_text(tmp_path, "evaluation") == "held out"


def test_a_folder_without_split_names_serves_both_splits(tmp_path):
    (tmp_path / "2.txt").write_text("second", encoding="utf-8")
    (tmp_path / "1.txt").write_text("first", encoding="utf-8")
    assert load_text(tmp_path, "calibration") == load_text(tmp_path, "evaluation") == "first\n\nsecond"


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no .txt files"):
        load_text(tmp_path)
    (tmp_path / "train_test.txt").write_text("which?", encoding="utf-8")
    with pytest.raises(UserError, match="rename it"):
        load_text(tmp_path)


def test_too_little_text_says_how_many_tokens(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100, encoding="utf-8")
    with pytest.raises(UserError, match=r"too short: 100 tokens.*need 101"):
        calibration_windows(tokenizer, source=path, n=1, seq_len=100)
    with pytest.raises(UserError, match=r"too short: 100 tokens.*need 128"):
        evaluation_windows(tokenizer, source=path, n=2, seq_len=64)
    assert evaluation_windows(tokenizer, source=path, n=2, seq_len=50).shape == (2, 50)


def test_bad_arguments_are_refused(tokenizer):
    with pytest.raises(UserError, match=r"austen, wikitext2, c4"):
        load_text("no-such-source")
    with pytest.raises(UserError, match="unknown split"):
        load_text("austen", "train")
    with pytest.raises(UserError, match="seq_len must be a positive integer"):
        evaluation_windows(tokenizer, n=2, seq_len=0)


def test_online_sources_without_datasets_suggest_a_local_file():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="local .txt file"):
            load_text("wikitext2")
    else:
        pytest.skip("datasets is installed; fetching WikiText-2 would need the network")


def test_a_mix_parses_into_sources_and_shares():
    assert parse_mix("austen") is None and parse_mix("notes/v2:draft.txt") is None
    assert parse_mix("austen:0.25, notes.txt:0.75") == [("austen", 0.25), ("notes.txt", 0.75)]
    assert parse_mix("austen:1") == [("austen", 1.0)]


@pytest.mark.parametrize("text, says", [
    ("austen:0.5,notes.txt:0.4", "sum to 0.9"), ("austen:0.5,notes.txt", "SOURCE:SHARE"),
    ("austen:0.5,austen:0.5", "twice"), ("austen:1.5,notes.txt:-0.5", "outside (0, 1]"), (":1", "SOURCE:SHARE"),
])
def test_a_bad_mix_is_refused_with_its_reason(text, says):
    with pytest.raises(UserError, match=re.escape(says)):
        parse_mix(text)


def test_mix_counts_sum_to_the_windows_by_largest_remainder():
    assert mix_counts([("a", 0.5), ("b", 0.5)], 7) == [4, 3]
    assert mix_counts([("a", 0.2), ("b", 0.3), ("c", 0.5)], 64) == [13, 19, 32]
    with pytest.raises(UserError, match="gives b no window of 4; raise"):
        mix_counts([("a", 0.9), ("b", 0.1)], 4)


def test_a_mix_takes_each_sources_windows_as_that_source_alone_gives_them(tmp_path, tokenizer):
    notes = tmp_path / "notes.txt"
    notes.write_text("Another kind of English: manuals, licences and notes. " * 40)
    mixed = calibration_windows(tokenizer, f"austen:0.75,{notes}:0.25", n=8, seq_len=32, seed=2)
    austen = calibration_windows(tokenizer, "austen", n=6, seq_len=32, seed=2)
    other = calibration_windows(tokenizer, str(notes), n=2, seq_len=32, seed=2)
    assert mixed.shape == (8, 32)
    assert sorted(map(tuple, mixed.tolist())) == sorted(map(tuple, torch.cat([austen, other]).tolist()))
    assert mixed[:4].tolist() != austen[:4].tolist()  # interleaved: a prefix is a mix, not the first source
    assert torch.equal(mixed, calibration_windows(tokenizer, f"austen:0.75,{notes}:0.25", n=8, seq_len=32, seed=2))

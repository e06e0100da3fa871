"""Text for calibration and evaluation: sources (Austen by default, local files, WikiText-2/C4) and token windows."""

from nexus_export.data.bos import BOS_MODES, BosChoice, choose_bos
from nexus_export.data.sources import load_text
from nexus_export.data.windows import calibration_windows, evaluation_windows

__all__ = ["load_text", "calibration_windows", "evaluation_windows", "BOS_MODES", "BosChoice", "choose_bos"]

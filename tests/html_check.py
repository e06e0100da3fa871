"""A strict HTML check for the pages nexus-export writes: every element closed in order, the images and links."""

from html.parser import HTMLParser

VOID = {"meta", "img", "br", "hr", "link", "input"}
PNG = b"\x89PNG\r\n\x1a\n"


class StrictPage(HTMLParser):
    """Every element closed in order; collects the sources of images and links."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.images, self.links, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("a", "link", "script"):
            self.links.append(attrs.get("href") or attrs.get("src") or "")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def parse(text: str) -> StrictPage:
    parser = StrictPage()
    parser.feed(text)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    assert text.startswith("<!DOCTYPE html>")
    return parser

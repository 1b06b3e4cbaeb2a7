"""Rebuild the texts of this folder's evaluation from files installed on the machine.

    python benchmarks/results/eval/unseen/make_texts.py OUTDIR [MAX_CHARS]

writes OUTDIR/vim-usr.txt, OUTDIR/rust-book.txt, OUTDIR/py-email.txt,
OUTDIR/licenses.txt and OUTDIR/py-argparse.txt and prints their sizes and SHA-256.
With MAX_CHARS (the committed texts/ used 100000), each text is cut after its last
newline within the first MAX_CHARS characters; 100000 characters are 26K to 28.5K
SmolLM2 tokens, more than the 2 x 8192 that --tokens 8192 reads.
Sources (Debian 12 image of 2026-12, rustup stable 1.95.0, pyenv CPython 3.11.7):

* vim-usr.txt: the Vim user manual, /usr/share/vim/vim90/doc/usr_01.txt .. usr_90.txt
  (every usr_NN.txt in numeric order, usr_toc.txt left out), joined by blank lines.
  Open Publication License v1.0 (usr_01.txt section 01.4).
* rust-book.txt: "The Rust Programming Language" (the Book), the text of the <main>
  element of rustup's offline copy .../share/doc/rust/html/book/print.html, with
  scripts, styles, and the hidden ("boring") lines of code examples left out, HTML
  entities decoded. MIT OR Apache-2.0 (The Rust Project Developers, per rustup's
  share/doc/rust/COPYRIGHT.html).
* py-email.txt: the source of CPython 3.11.7's email package, Lib/email/*.py and
  Lib/email/mime/*.py in sorted path order, each preceded by a "# file: NAME" line.
  Python Software Foundation License.
* licenses.txt (added 2026-12-04): /usr/share/common-licenses/GPL-3, GFDL-1.3, MPL-2.0,
  LGPL-3 and Apache-2.0 of Debian's base-files, concatenated as they are (93,840
  bytes, under 100000 characters: not cut). Each licence text may be copied verbatim.
* py-argparse.txt (added 2026-12-04): CPython 3.11.7's Lib/argparse.py as it is
  (99,661 bytes). Python Software Foundation License.
"""
import hashlib
import sys
import sysconfig
from html.parser import HTMLParser
from pathlib import Path

VIM = Path("/usr/share/vim/vim90/doc")
BOOK = (Path.home() / ".rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html"
        / "book/print.html")
BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "pre", "blockquote",
         "tr", "table", "ul", "ol", "dl", "dt", "dd", "br", "hr", "section", "figure"}


class _BookText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.in_main, self.skip = [], False, []

    def handle_starttag(self, tag, attrs):
        if tag == "main":
            self.in_main = True
        cls = dict(attrs).get("class") or ""
        if self.skip or tag in ("script", "style") or "boring" in cls.split():
            if tag not in ("br", "hr", "img", "meta", "link", "input"):
                self.skip.append(tag)
            return
        if self.in_main and tag in BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip[-1]:
                self.skip.pop()
            return
        if tag == "main":
            self.in_main = False
        if self.in_main and tag in BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if self.in_main and not self.skip:
            self.out.append(data)


def rust_book() -> str:
    parser = _BookText()
    parser.feed(BOOK.read_text(encoding="utf-8"))
    lines = [line.rstrip() for line in "".join(parser.out).splitlines()]
    text, blank = [], 0
    for line in lines:
        blank = blank + 1 if not line.strip() else 0
        if blank <= 1:
            text.append(line)
    return "\n".join(text).strip() + "\n"


def vim_usr() -> str:
    files = sorted(VIM.glob("usr_[0-9][0-9].txt"))
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files) + "\n"


def py_email() -> str:
    root = Path(sysconfig.get_paths()["stdlib"]) / "email"
    files = sorted(root.glob("*.py")) + sorted((root / "mime").glob("*.py"))
    parts = (f"# file: {f.relative_to(root.parent)}\n" + f.read_text(encoding="utf-8").strip()
             for f in files)
    return "\n\n".join(parts) + "\n"


LICENSES = Path("/usr/share/common-licenses")


def licenses() -> str:
    """Five licence texts of Debian's base-files, in this order, each file as it is."""
    names = ("GPL-3", "GFDL-1.3", "MPL-2.0", "LGPL-3", "Apache-2.0")
    return "".join((LICENSES / name).read_text(encoding="utf-8") for name in names)


def py_argparse() -> str:
    """CPython's argparse module source, as it is."""
    return (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text(encoding="utf-8")


def main(out: str, max_chars: int | None = None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in (("vim-usr", vim_usr), ("rust-book", rust_book), ("py-email", py_email),
                       ("licenses", licenses), ("py-argparse", py_argparse)):
        text = make()
        if max_chars is not None and len(text) > max_chars:
            text = text[: text.rindex("\n", 0, max_chars) + 1]
        path = out / f"{name}.txt"
        path.write_text(text, encoding="utf-8")
        digest = hashlib.sha256(text.encode()).hexdigest()
        print(f"{path}  {len(text.encode())} bytes  sha256 {digest}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".", int(sys.argv[2]) if len(sys.argv) > 2 else None)

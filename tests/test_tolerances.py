"""Every chosen float tolerance in tests/ carries a one-line reason (issue 22).

A line that sets a tolerance — an ``rtol=``, ``atol=``, ``rel=`` or ``abs=`` keyword with a
non-zero value, in ``torch.testing.assert_close``, ``np.testing.assert_allclose``,
``pytest.approx``, ``torch.allclose``/``np.allclose`` or a helper's signature — must have a
``#`` comment on the same line or on the line above saying why that size. Exempt: exact
checks (every tolerance keyword 0) and calls that keep the library default, which means
"equal up to float rounding" (``assert_close``: derived from the dtype, e.g. float32
rtol 1.3e-6, float64 1e-7; ``pytest.approx``: rel 1e-6; ``allclose``: rtol 1e-5, atol 1e-8).
"""
from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

TESTS = Path(__file__).resolve().parent
_KEYWORD = r"[(,](rtol|atol|rel|abs)=(?!=)"
TOLERANCE = re.compile(_KEYWORD)
_ZERO = re.compile(_KEYWORD + r"0(?![.\deE])")


def _scan(source: str) -> tuple[dict[int, str], set[int]]:
    """(line -> code without strings/comments/spaces, lines that carry a ``#`` comment),
    from the tokenizer so that a ``#`` or ``rtol=`` inside a string does not count."""
    code: dict[int, list[str]] = {}
    comments = set()
    skip = {tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1),
            getattr(tokenize, "FSTRING_START", -1), getattr(tokenize, "FSTRING_END", -1)}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            if len(tok.string.strip("# ")) >= 3:
                comments.add(tok.start[0])
        elif tok.type not in skip:
            code.setdefault(tok.start[0], []).append(tok.string)
    return {k: "".join(v) for k, v in code.items()}, comments


def unexplained(source: str) -> list[int]:
    """Line numbers of tolerance lines without a reason comment on the line or the one above."""
    code, comments = _scan(source)
    return [no for no, line in sorted(code.items())
            if TOLERANCE.search(_ZERO.sub("", line)) and not {no, no - 1} & comments]


def test_every_tolerance_has_a_reason():
    bad = [f"{p.relative_to(TESTS.parent)}:{no}: {p.read_text().splitlines()[no - 1].strip()}"
           for p in sorted(TESTS.rglob("*.py")) for no in unexplained(p.read_text())]
    assert not bad, (f"{len(bad)} tolerance line(s) without a reason comment on the line or "
                     "the line above:\n" + "\n".join(bad))


def test_the_scanner_catches_an_unexplained_tolerance():
    source = ("import torch\n"
              "def test_x(a, b):\n"
              "    torch.testing.assert_close(a, b, rtol=1e-3, atol=0)\n"       # 3: flagged
              "    assert a == pytest.approx(b, rel=0.1)\n"                      # 4: flagged
              "    # float32 sums of 10^4 terms\n"
              "    assert torch.allclose(a, b, atol=1e-4)\n"                      # reason above
              "    assert a == pytest.approx(b, abs=1e-9)  # float64 rounding\n"  # reason beside
              "    s = 'rtol=1e-3'\n"                                             # a string
              "    rel = a - b\n"                                                 # not a keyword
              "    torch.testing.assert_close(a, b, rtol=0, atol=0)\n"            # exact
              "    torch.testing.assert_close(a, b)\n"                            # default
              "def helper(a, b, rtol=1e-5):\n"                                    # 12: flagged
              "    pass\n")
    assert unexplained(source) == [3, 4, 12]

"""A labelled corpus of short real texts from Debian's `fortunes` package.

    apt-get install fortunes        # about 850 KB; topic files in /usr/share/games/fortunes
    bin/e3-make-fortunes --out fortunes.jsonl

Each entry of a topic file (entries are separated by lines holding "%") is a
real text; its label is the topic file's name. Only short entries are kept
(3 to `max_words` words, whitespace normalised), the classes are balanced by a
cap per topic, and the order is a fixed shuffle, so the output is the same on
every machine with the same package version. Nothing in the tests depends on
the package being installed.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
DEFAULT_TOPICS = ("computers", "food", "love", "politics", "science", "sports")


def read_topic(path: Path, max_words: int) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = (" ".join(_without_attribution(e).split()) for e in re.split(r"^%\s*$", text, flags=re.M))
    return [e for e in entries if 3 <= len(e.split()) <= max_words]


def _without_attribution(entry: str) -> str:
    """Drop "-- Author" lines: the label must come from what is said, not who said it."""
    return "\n".join(line for line in entry.splitlines() if not line.lstrip().startswith("--"))


def build(topics=DEFAULT_TOPICS, per_topic: int = 100, max_words: int = 20, root: Path = FORTUNES_DIR,
          seed: int = 0) -> list[dict]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist: install Debian's fortunes package (apt-get install fortunes)")
    rows = []
    for topic in topics:
        path = root / topic
        if not path.is_file():
            raise FileNotFoundError(f"no topic file {path}")
        entries = sorted(set(read_topic(path, max_words)))
        random.Random(f"{seed}-{topic}").shuffle(entries)
        rows += [{"text": t, "label": topic} for t in entries[:per_topic]]
    random.Random(seed).shuffle(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="e3-make-fortunes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--topics", default=",".join(DEFAULT_TOPICS))
    p.add_argument("--per-topic", type=int, default=100)
    p.add_argument("--max-words", type=int, default=20)
    p.add_argument("--root", default=str(FORTUNES_DIR))
    args = p.parse_args(argv)
    try:
        rows = build(args.topics.split(","), args.per_topic, args.max_words, Path(args.root))
    except FileNotFoundError as exc:
        print(f"e3-make-fortunes: error: {exc}", file=sys.stderr)
        return 2
    with open(args.out, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    counts = {t: sum(r["label"] == t for r in rows) for t in args.topics.split(",")}
    print(f"wrote {len(rows)} texts to {args.out}: {counts}")
    return 0

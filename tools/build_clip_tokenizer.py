"""Derive the CLIP BPE tokenizer files shipped in ``src/attnprobe/models/data/clip`` (run once; the output is committed).

Source: ``open_clip/bpe_simple_vocab_16e6.txt.gz`` from the open_clip_torch wheel (MIT), the same file as
OpenAI CLIP's. The vocabulary is built as CLIP builds it: the 256 byte characters, the same with ``</w>``,
the 48,894 merges joined, then ``<|startoftext|>`` and ``<|endoftext|>``: 49,408 ids.

    pip download --no-deps open_clip_torch -d /tmp/oc && cd /tmp/oc && unzip *.whl
    python tools/build_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""

import gzip
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "attnprobe" / "models" / "data" / "clip"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def main(src: str) -> None:
    lines = gzip.open(src, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    assert len(merges) == 48894, len(merges)
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])

"""Render tools/bench.py's JSON as Markdown tables (one per shape): python tools/bench_report.py FILE

Each cell: LoRA's extra ms over the implementation's own base, median [min-max] over the rounds, then
the LoRA / base ratio's median [min-max]. The F.linear column is the base anchor (ms, median [min-max]).
"""

import json
import sys

NAMES = {"ours": "reference", "fast": "fast path", "mb": "Megatron-Bridge", "peft": "PEFT"}


def span(stat: dict, digits: int = 3) -> str:
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}-{stat['max']:.{digits}f}]"


def cell(row: dict, who: str) -> str:
    if who not in row or "extra_ms" not in row[who]:
        return "—"
    entry = row[who]
    return f"base {entry['base_ms']['median']:.3f}; +{span(entry['extra_ms'])} ms; **{span(entry['ratio'])}**"


def main(path: str) -> None:
    data = json.load(open(path))
    rates = data["rates"]
    print(f"{data['device']} ×{data['world']}, torch {data['torch']}, {data['tokens']} tokens, {data.get('dtype', 'bfloat16')}, "
          f"{data['rounds']} interleaved rounds × {data['repeats']} timed steps; measured matmul "
          f"{rates['matmul_flops'] / 1e12:.0f} TFLOP/s, copy {rates['copy_bytes'] / 1e12:.2f} TB/s\n")
    present = [who for who in NAMES if any(who in r and "extra_ms" in r[who] for r in data["rows"])]
    shapes = sorted({(r["H"], r["FFN"]) for r in data["rows"]})
    for h, ffn in shapes:
        print(f"#### H × FFN = {h} × {ffn}\n")
        print("| base | r | TP | F.linear ms | " + " | ".join(NAMES[w] for w in present) + " | floor (extra ms) |")
        print("|---|---|---|---|" + "---|" * len(present) + "---|")
        for r in data["rows"]:
            if (r["H"], r["FFN"]) != (h, ffn):
                continue
            print(f"| {r['kind']} | {r['r']} | {r['tp']} | {span(r['F.linear']['base_ms'])} | "
                  + " | ".join(cell(r, w) for w in present) + f" | {r['floor_extra_ms']:.3f} |")
        print()
    print("merge_lora, 32 layers H=4096 (qkv, proj, gated fc1, fc2), r=16: "
          + ", ".join(f"{k}: " + (f"{v:.3f} s" if isinstance(v, float) else
                                  ", ".join(f"{when} {s:.3f} s" for when, s in v.items()))
                      for k, v in data["merge_lora_s"].items()))


if __name__ == "__main__":
    main(sys.argv[1])

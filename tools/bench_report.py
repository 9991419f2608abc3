"""Render tools/bench.py's JSON as Markdown tables (one per shape): python tools/bench_report.py FILE"""

import json
import sys


def fmt(row, who):
    if f"{who}_base_ms" not in row:
        return "—"
    return f"{row[f'{who}_base_ms']:.3f} / {row[f'{who}_lora_ms']:.3f} / **{row[f'{who}_ratio']:.3f}**"


def main(path: str) -> None:
    data = json.load(open(path))
    rates = data["rates"]
    print(f"{data['device']} ×{data['world']}, torch {data['torch']}, {data['tokens']} tokens, bf16; measured "
          f"matmul {rates['matmul_flops'] / 1e12:.0f} TFLOP/s, copy {rates['copy_bytes'] / 1e12:.2f} TB/s\n")
    shapes = sorted({(r["H"], r["FFN"]) for r in data["rows"]})
    for h, ffn in shapes:
        print(f"#### H × FFN = {h} × {ffn} (base ms / with LoRA ms / ratio)\n")
        print("| base | r | TP | ours | Megatron-Bridge | PEFT | floor (extra ms / ratio) |")
        print("|---|---|---|---|---|---|---|")
        for r in data["rows"]:
            if (r["H"], r["FFN"]) != (h, ffn):
                continue
            print(f"| {r['kind']} | {r['r']} | {r['tp']} | {fmt(r, 'ours')} | {fmt(r, 'mb')} | {fmt(r, 'peft')} | "
                  f"{r['floor_extra_ms']:.3f} / {r['floor_ratio']:.3f} |")
        print()
    print("merge_lora, 32 layers H=4096 (qkv, proj, gated fc1, fc2), r=16: "
          + ", ".join(f"{k}: {v:.3f} s" for k, v in data["merge_lora_s"].items()))


if __name__ == "__main__":
    main(sys.argv[1])

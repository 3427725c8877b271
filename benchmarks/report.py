"""Markdown for one benchmark run (appended to benchmarks/RESULTS.md by benchmarks.run)."""

from __future__ import annotations

from pathlib import Path


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _training(section: dict) -> list[str]:
    lines = ["### Training throughput (target tokens/s, full step: forward + backward + Adam)", "",
             f"Batches: {section['lengths']}; loss: {section['loss']}, aiayn projects only non-padding "
             "positions, the peers every position."
             + (f" Allocator (every system): {section['allocator']}." if "allocator" in section else ""), ""]
    for preset, shape in section["shapes"].items():
        config = shape["config"]
        lines.append(
            f"**{preset}** (d={config['d_model']}, h={config['n_heads']}, ff={config['d_ff']}, "
            f"layers={config['n_encoder_layers']}+{config['n_decoder_layers']}, V={config['vocab_size']}), "
            f"batches of <= {shape['max_tokens']} tokens (mean {shape['mean_target_tokens_per_batch']} target "
            f"tokens), {shape['results'][0]['timed_steps']} timed steps:"
        )
        lines.append("")
        ours = {r["precision"]: r["tokens_per_s"] for r in shape["results"] if r["system"].startswith("aiayn")}
        has_mfu = any("mfu" in r for r in shape["results"])
        header = ["system", "tokens/s", "GFLOP/s"] + (["MFU"] if has_mfu else []) + ["aiayn / system (same precision)"]
        rows = []
        for r in shape["results"]:
            row = [r["system"], f"{r['tokens_per_s']:,.0f}", r["gflops_per_s"]]
            if has_mfu:
                row.append(f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-")
            row.append(_ratio(ours.get(r["precision"]), r["tokens_per_s"]))
            rows.append(row)
        lines += _table(header, rows)
        if "fp32" in ours and "bf16" in ours:
            lines += ["", f"aiayn bf16 / fp32: {_ratio(ours['bf16'], ours['fp32'])}"]
        lines.append("")
    return lines


def _decoding(section: dict) -> list[str]:
    lines = ["### Decoding speed (same weights in all systems)", "",
             f"{section['sentences']} sentences of {section['sources']}, sorted by length, in batches of "
             f"{' / '.join(map(str, section['batch_sizes']))} sentences, every output capped at "
             f"{section['length_cap']} tokens (random "
             f"weights never emit EOS; the cap is the mean reference length), length penalty "
             f"{section['length_penalty']} (aiayn GNMT, HF / CTranslate2 len^alpha).", ""]
    for note in section["notes"]:
        lines += [f"Note: {note}", ""]
    for mode, rows in section["modes"].items():
        speed = {r["system"]: r["tokens_per_s"] for r in rows}
        ours_fp32 = speed.get("aiayn fp32")
        ours_best = max(v for k, v in speed.items() if k.startswith("aiayn"))
        lines.append(f"**{mode}**")
        lines.append("")
        lines += _table(
            ["system", "tokens/s", "sentences/s", "aiayn fp32 / system", "aiayn fastest / system",
             "same output as aiayn fp32", "warm-up s"],
            [[r["system"], f"{r['tokens_per_s']:,.0f}", r["sentences_per_s"], _ratio(ours_fp32, r["tokens_per_s"]),
              _ratio(ours_best, r["tokens_per_s"]), f"{100 * r['same_output_as_aiayn']:.0f}%",
              r.get("warmup_seconds", "-")]
             for r in rows],
        )
        summary = []
        for ours, peer in (("aiayn fp32", "HF Marian fp32"), ("aiayn fp32+compile", "HF Marian fp32"),
                           ("aiayn bf16", "HF Marian bf16"), ("aiayn bf16+compile", "HF Marian bf16"),
                           ("aiayn int8", "HF Marian int8"), ("aiayn int8+compile", "HF Marian int8"),
                           ("aiayn fp32", "CTranslate2 fp32"), ("aiayn fp32+compile", "CTranslate2 fp32"),
                           ("aiayn int8", "CTranslate2 int8"), ("aiayn int8+compile", "CTranslate2 int8")):
            if ours in speed and peer in speed:
                summary.append(f"{ours} / {peer} {_ratio(speed[ours], speed[peer])}")
        hf = [v for k, v in speed.items() if k.startswith("HF")]
        if hf:
            summary.append(f"fastest aiayn / fastest HF {_ratio(ours_best, max(hf))}")
        ct2 = [v for k, v in speed.items() if k.startswith("CTranslate2")]
        if ct2:
            summary.append(f"fastest aiayn / fastest CTranslate2 {_ratio(ours_best, max(ct2))}")
        if summary:
            lines += ["", "; ".join(summary)]
        lines.append("")
    return lines


def _attention(section: dict) -> list[str]:
    lines = [f"### Attention memory: one MultiHeadAttention layer, forward + backward "
             f"(batch {section['batch']}, d_model {section['d_model']}, {section['heads']} heads, {section['device']})",
             "", f"Peak memory: {section['memory_measure']}; time: mean of {section['repeats']} calls. "
             "reference = need_weights=True path, fast = F.scaled_dot_product_attention.", ""]
    rows = []
    for p in section["points"]:
        ref, fast = p.get("reference", {}), p.get("fast", {})
        rows.append([
            p["length"], p["attention_matrix_mib"], ref.get("peak_mib", ref.get("error", "-")),
            fast.get("peak_mib", fast.get("error", "-")), f"{p['memory_ratio']}x" if "memory_ratio" in p else "-",
            ref.get("ms", "-"), fast.get("ms", "-"), f"{p['time_ratio']}x" if "time_ratio" in p else "-",
        ])
    lines += _table(["L", "one H x L x L fp32 matrix (MiB)", "reference peak (MiB)", "fast peak (MiB)",
                     "memory ref / fast", "reference ms", "fast ms", "time ref / fast"], rows)
    return lines + [""]


def markdown(result: dict, *, command: str) -> str:
    m = result["machine"]
    v = m["versions"]
    lines = [
        f"## {m.get('machine_class', 'unknown')} CPU: {m['date']} ({result['mode']}, {result['device']})", "",
        f"- command: `{command}`",
        f"- machine: {m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX flags found'}; PyTorch vector kernels "
        f"{m.get('aten_capability', '?')}), {m['cores']} cores, torch threads {m['torch_threads']}, "
        f"GPU: {m['gpu'] or 'none'}",
        f"- versions: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"ctranslate2 {v['ctranslate2']}, aiayn {v['aiayn']}; git {m['git_commit']}",
        f"- load average (1, 5, 15 min): start {m['load_average_start']}, end {m.get('load_average_end')}; "
        f"run took {result.get('seconds')} s",
    ]
    lines += [f"- note: {note}" for note in result["notes"]]
    lines.append("")
    if "training" in result:
        lines += _training(result["training"])
    if "decoding" in result:
        lines += _decoding(result["decoding"])
    if "attention" in result:
        lines += _attention(result["attention"])
    return "\n".join(lines) + "\n"


def _markers(machine_class: str) -> tuple[str, str]:
    return f"<!-- latest run, machine class {machine_class} -->", f"<!-- end of machine class {machine_class} -->"


def update_results(results_md: Path, section: str, machine_class: str) -> None:
    """Put `section` (one run's Markdown) into `results_md` as the latest run of its machine class,
    replacing the one before it (earlier runs: git history and the JSON files). Other classes'
    sections and the text around them stay."""
    results_md = Path(results_md)
    begin, end = _markers(machine_class)
    text = results_md.read_text(encoding="utf-8") if results_md.exists() else ""
    block = f"{begin}\n{section.strip()}\n{end}\n"
    start = text.find(begin)
    if start >= 0:
        stop = text.index(end, start) + len(end) + 1
        text = text[:start] + block + text[stop:]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block
    results_md.write_text(text, encoding="utf-8")

"""bench.py's report: the speed table, acceptance by depth, the per-part profile (also in AR steps), the bytes and
roofline lines, compile and host-sync counts, and the transformers peer, printed from bench's result dict."""

COMPONENTS = ("draft", "tree", "verify", "accept", "commit")  # the parts of a round, as `--profile` times them


def print_report(result: dict, profile: bool) -> None:
    config, ar, rows, prompts = result["config"], result["ar"], result["budgets"], len(result["per_prompt"])
    sampling = f"temperature {config['temperature']}" if config["temperature"] else "greedy"
    sampling += "".join(f", {name} {config[key]}" for name, key, off in (("top-p", "top_p", 1.0), ("top-k", "top_k", 0))
                        if config["temperature"] and config[key] != off)
    print(f"nanojet bench | {config.get('synthetic') or config['model']} | {config['device']} {config['dtype']} | "
          f"{prompts} prompts ({config['prompts_source']}) | max_new_tokens {config['max_new_tokens']} | {sampling}")
    print("tok/s and speedup over decode time (prefill excluded); tau: tokens per round incl. the bonus; "
          "tok/fwd: new tokens per target forward")
    print(f"{'budget':>6} {'AR tok/s':>9} {'spec tok/s':>10} {'speedup':>8} {'tau':>6} {'tok/fwd':>8} "
          f"{'round/AR step':>13}")
    for r in rows:
        print(f"{r['budget']:>6} {r['ar_tokens_per_s']:>9.1f} {r['spec_tokens_per_s']:>10.1f} {r['speedup']:>7.2f}x "
              f"{r['tau']:>6.2f} {r['tokens_per_forward']:>8.2f} {r['round_over_ar_step']:>13.2f}")
    drafted = [r for r in rows if r["accept_rate_by_depth"]]
    if drafted:
        print("acceptance by depth d: share of rounds that accepted >= d drafted tokens")
        depths = range(1, len(drafted[0]["accept_rate_by_depth"]) + 1)
        print(f"{'budget':>6} " + " ".join(f"{'d' + str(d):>5}" for d in depths))
        for r in drafted:
            print(f"{r['budget']:>6} " + " ".join(f"{a:>5.2f}" for a in r["accept_rate_by_depth"]))
    if profile:
        print("per-component latency, ms per round (AR: per step); wall also counts the loop around them")
        print(f"{'mode':>6} " + " ".join(f"{c:>8}" for c in COMPONENTS) + f" {'total':>8} {'wall':>8}")
        for name, s in [("AR", ar)] + [(str(r["budget"]), r) for r in rows]:
            split = s["time_split_ms_per_round"]
            print(f"{name:>6} " + " ".join(f"{split.get(c, 0.0):>8.3f}" for c in COMPONENTS) +
                  f" {sum(split.values()):>8.3f} {s['round_ms']:>8.3f}")
        print(f"the same in AR steps ({ar['round_ms']:.3f} ms): what each part of a round costs against plain decoding")
        for name, s in [(str(r["budget"]), r) for r in rows]:
            split = s["time_split_ms_per_round"]
            print(f"{name:>6} " + " ".join(f"{split.get(c, 0.0) / ar['round_ms']:>8.3f}" for c in COMPONENTS) +
                  f" {sum(split.values()) / ar['round_ms']:>8.3f} {s['round_ms'] / ar['round_ms']:>8.3f}")
    bandwidth = (f"AR step {result['ar_step_ms']:.3f} ms reads {result['weight_bytes_per_step'] / 1e9:.3f} GB of "
                 f"weights: {result['achieved_bytes_per_s'] / 1e9:.1f} GB/s")
    if "bandwidth_fraction" in result:
        bandwidth += (f" = {100 * result['bandwidth_fraction']:.1f}% of the measured device copy bandwidth "
                      f"({result['copy_bytes_per_s'] / 1e9:.0f} GB/s)")
    print(bandwidth)
    print(f"roofline: a one-row matrix product reads {result['matvec_bytes_per_s'] / 1e9:.1f} GB/s of weights here, so "
          f"a decode step cannot take less than {result['roofline_step_ms']:.3f} ms; the AR step takes "
          f"{result['ar_step_ms'] / result['roofline_step_ms']:.2f}x that")
    compiled = result["compiled"]
    if config["execution"] != "eager":
        times = ", ".join(f"{'AR' if name == 'ar' else 'budget ' + str(name)} {seconds:.1f} s"
                          for name, seconds in compiled["compile_s"].items())
        print(f"compile/capture during warmup (not in the times above): {times}; graphs built while measuring: "
              f"{compiled['graphs_built_while_measuring']} (0 expected)")
    if "host_syncs_per_round" in compiled:
        print("host syncs per round: " + ", ".join(f"{'AR' if name == 'ar' else 'budget ' + str(name)} {n:.2f}"
                                                   for name, n in compiled["host_syncs_per_round"].items()))
    for name, places in compiled.get("syncs_beyond_outcome_read", {}).items():
        for place in places:  # a traceback of each host wait a round makes besides reading its outcome
            print(f"host sync beyond the outcome read, {'AR' if name == 'ar' else 'budget ' + str(name)}: {place}")
    if config.get("synthetic"):
        agree = sum(all(s["lossless"] for s in p["spec"].values()) for p in result["per_prompt"])
        print(f"synthetic: {agree}/{prompts} prompts match AR (random weights make near-ties; not checked)")
    if "peer_hf" in result:
        peer, best = result["peer_hf"], max(rows, key=lambda r: r["speedup"])
        print(f"HF transformers generate: {peer['decode_tokens_per_s']:.1f} tok/s decode | nanojet AR "
              f"{ar['decode_tokens_per_s']:.1f} | speculative {best['spec_tokens_per_s']:.1f} "
              f"(budget {best['budget']}) | same greedy ids as nanojet AR on {peer['agrees_with_ar']}/{prompts}")

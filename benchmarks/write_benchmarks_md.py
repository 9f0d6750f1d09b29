"""Render ``docs/BENCHMARKS.md`` from the JSON results in ``benchmarks/results/`` (see ``record.py``).

Every section names the command, date, machine and versions behind its figures. Usage:
``.venv/bin/python benchmarks/write_benchmarks_md.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from record import RESULTS_DIR

OUT = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
STAGES = ("dispatch", "receive", "prepare", "work", "pack", "send", "server")


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def provenance(record: dict) -> list[str]:
    m, v = record["machine"], record["versions"]
    return [
        f"Command: `{record['command']}`  ",
        f"Date: {record['date']}; machine: {m['cores']} cores ({m['cpu']}), {m['memory_gb']} GB; "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        "",
    ]


ROUND_COST_NOTES = (
    "Stages (`benchmarks/round_cost.py`): dispatch = round start to the server handing the task out (the site polls"
    " for tasks every `task_request_interval`); receive = model download; prepare = task received to the site's work"
    " starting; work = the site's validation + training; pack = work done to sending; send = upload; server = last"
    " result to round end (task completion checks every `task_check_period`, aggregation, persisting). Prepare and"
    " pack each hold one poll of NVFlare 2.9's in-process Client API (0.5 s, no knob in 2.9): the script waits for"
    " its task and the executor for its result. Targets: round / work <= 1.10 at the demo's settings and <= 1.05 at"
    " the job's own local epochs."
)


def round_cost(record: dict) -> list[str]:
    lines = ["## What a round costs", "", *provenance(record)]
    lines += [
        ROUND_COST_NOTES,
        "",
        "Mean over rounds >= 1 along the slowest site's path (s); round 0 adds the sites' start-up.",
        "",
    ]
    rows = []
    for run in record["result"]["runs"]:
        later = run["later_rounds_mean"]
        rows.append([run["label"], f"{later['round_s']:.2f}", *(f"{later[s]:.2f}" for s in STAGES)])
        rows[-1] += [run["ratio_round_to_work"], f"{run['round_0'].get('round_s', float('nan')):.1f}"]
    lines += table(["run", "round", *STAGES, "round / work", "round 0"], rows)
    return [*lines, ""]


def throughput(record: dict) -> list[str]:
    result = record["result"]
    lines = ["## Training throughput inside the FL client", "", *provenance(record)]
    lines += [
        f"Median epoch time, {result['threads_per_site']} thread(s) per site, sites side by side.",
        "",
    ]
    header = ["site", "in the FL client (s)", "standalone `monai.bundle run` (s)", "throughput ratio"]
    keys = ("in_fl_epoch_s", "standalone_epoch_s", "throughput_ratio")
    lines += table(header, [[site, *(row[k] for k in keys)] for site, row in result.items() if isinstance(row, dict)])
    return [*lines, ""]


def site_profile(record: dict) -> list[str]:
    result = record["result"]
    lines = ["## Where a site's time goes (profile)", "", *provenance(record)]
    lines += [
        f"py-spy samples of {result['site']}'s job process over a whole run of the one command ({result['rounds']}"
        f" rounds x {result['local_epochs']} local epochs, {result['rate_hz']} Hz, running threads only:"
        f" {result['samples']} samples). The bundle's training and validation are what standalone"
        " `monai.bundle run` spends too; the rest is what the FL client adds.",
        "",
    ]
    lines += table(["share", "what"], [[f"{100 * share:.1f} %", name] for name, share in result["shares"].items()])
    return [*lines, ""]


def _mean_over_sites(dice: dict | float | None) -> float:
    if isinstance(dice, dict):
        return sum(dice.values()) / len(dice) if dice else float("nan")
    return float("nan") if dice is None else float(dice)


def he_round_time(record: dict) -> list[str]:
    result = record["result"]
    s = result["settings"]
    lines = ["## HE: round time on POC", "", *provenance(record)]
    lines += [
        f"The local job and the HE job through the one command, {s['sites']} sites, {s['rounds']} rounds x"
        f" {s['local_epochs']} local epochs, {s['synthetic_cases']} synthetic cases; means over the rounds. Overhead ="
        " server round minus the slowest site's own work.",
        "",
    ]
    header = ["pair", "plain round (s)", "HE round (s)", "HE / plain", "plain overhead (s)", "HE overhead (s)"]
    header += ["HE adds (s)", "encrypt", "aggregate", "decrypt", "Dice plain / HE (mean of sites)"]
    rows = []
    for k, r in enumerate(result["pairs"]):
        dice = " / ".join(f"{_mean_over_sites(r['final_global_dice'][j]):.4f}" for j in ("plain", "he"))
        rows.append([k, r["plain_round_s"], r["he_round_s"], r["he_over_plain"], r["plain_overhead_s"]])
        rows[-1] += [r["he_overhead_s"], r.get("he_adds_s"), r["encrypt_s"], r["aggregate_s"], r["decrypt_s"], dice]
    lines += table(header, rows)
    return [*lines, ""]


def site_scaling(record: dict) -> list[str]:
    result = record["result"]
    shape = "x".join(map(str, result["shape"]))
    lines = ["## Sites on one machine", "", *provenance(record)]
    lines += [
        f"Tiny synthetic data ({shape}, 2 cases per site + 2), {result['rounds']} rounds x 1 local epoch, the"
        " local job; every site gets its share of the cores. Round 0 includes the sites' start-up; 'steady round'"
        " is the mean of the later rounds. Memory: peak resident set, sampled every 0.5 s (POC: the server's and"
        " each site's process tree; the simulator: its whole process tree). A POC run is skipped where the memory"
        f" fitted on the smaller runs predicts more than {result['memory_share']:.0%} of the machine's.",
        "",
    ]
    for system, res in result["systems"].items():
        lines += [f"### {'POC (the one command)' if system == 'poc' else 'Simulator'}", ""]
        header = ["sites", "server round times (s)", "steady round (s)", "slowest site's work (s)", "peak memory (MB)"]
        rows = []
        for run in res["runs"]:
            if run.get("skipped"):
                rows.append([run["sites"], f"skipped: {run['skipped']}", "", "", ""])
                continue
            later = run["fl_round_s"][1:]
            memory = f"{run['total_peak_mb']:.0f}"
            if system == "poc":
                memory += f" (server {run['server_peak_mb']:.0f}, largest site {run['site_peak_mb']:.0f})"
            steady = f"{sum(later) / len(later):.1f}" if later else "-"
            rows.append([run["sites"], run["fl_round_s"], steady, run["site_work_s"], memory])
        lines += table(header, rows) + [""]
        fits = [
            f"{SCALING_FITS[name]} {_signed(f['per_site'])} per site (R^2 {f['r2']})"
            for name, f in res["fit"].items()
            if f
        ]
        lines += ["Least-squares line against the number of sites: " + "; ".join(fits) + ".", ""]
    return [*lines, SCALING_NOTES, ""]


SCALING_NOTES = (
    "How to read it: each site is a process tree of about 1 GB (its NVFlare client and the job process with torch,"
    " MONAI and the bundle), a simulator worker as much as a POC client. On 2 cores the sites train in turn, so a"
    " steady round grows by 0.5-0.7 s per site at this data size, and round 0 by about 4.5 s per site (every job"
    " process starts and imports torch and MONAI on the same cores). The server's peak grows by about 90 MB per site,"
    " about 4.7 times the 19.3 MB model: it keeps every site's result until the round's aggregation, besides the"
    " message buffers (not profiled further). 16 sites on POC took 18.0 GB of this 23.5 GB machine."
)
SCALING_FITS = {
    "round_s": "steady round",
    "total_peak_mb": "peak memory (MB)",
    "server_peak_mb": "the server's peak memory (MB)",
}


def _signed(value: float) -> str:
    return f"{value:+.0f}" if abs(value) >= 10 else f"{value:+.2f} s"


def he_update_size(record: dict) -> list[str]:
    result = record["result"]
    plain = result["plain_bytes"]
    lines = ["## HE: one FedAvg round on the full-size network", "", *provenance(record)]
    lines += [
        "2 sites, one client update and the global model sent back; seconds per stage (this machine). Design and"
        " round-time figures on POC: `docs/secure_and_he.md`.",
        "",
    ]
    header = ["layout", "update (MB)", "x plaintext", "global model (MB)", "encrypt", "aggregate", "decrypt"]
    rows = []
    for layout, r in result["layouts"].items():
        rows.append([layout, f"{r['update_bytes'] / 1e6:.1f}", f"{r['update_bytes'] / plain:.2f}"])
        rows[-1] += [f"{r[k]:.1f}" for k in ("encrypt_s", "aggregate_s", "decrypt_s", "round_s")]
        rows[-1].insert(3, f"{r['model_bytes'] / 1e6:.1f}")
    lines += table([*header, "round work (s)"], rows)
    return [*lines, ""]


def settings_study(title: str, name: str):
    """A study of several data settings as a section: each setting's Dice chart (``images/<name>_<setting>_dice.png``,
    as save_validity.py copies them) and the study's tables."""

    def render(record: dict) -> list[str]:
        lines = [f"## {title}", "", *provenance(record)]
        for setting in record["result"].get("settings", {}).get("settings", []):
            image = f"{name}_{setting}_dice.png"
            if (OUT.parent / "images" / image).is_file():
                lines += [f"![{setting}: Dice of every arm, mean and range over the seeds](images/{image})", ""]
        markdown = record["result"].get("markdown")
        return [*lines, markdown or "(no tables in the result)", ""]

    return render


validity = settings_study("Does federation pay off (validity study)", "validity")
validity_scaffold = settings_study("SCAFFOLD over IID and non-IID sites (validity study)", "validity_scaffold")


def phase_study(title: str, image: str):
    """A study of the contrast-phase setting (site-1 non-contrast, site-2 portal venous) as a section of its own."""

    def render(record: dict) -> list[str]:
        lines = [f"## {title}", "", *provenance(record)]
        lines += [f"![Dice of every arm, mean and range over the seeds](images/{image})", ""]
        markdown = record["result"].get("markdown")
        return [*lines, markdown or "(no tables in the result)", ""]

    return render


validity_phase = phase_study(
    "FL methods when the sites differ in contrast phase (validity study)", "validity_phase_dice.png"
)
validity_phase_scaffold = phase_study(
    "SCAFFOLD when the sites differ in contrast phase (validity study)", "validity_phase_scaffold_dice.png"
)


def dp_utility(record: dict) -> list[str]:
    """FedAvg with DP-SGD at several epsilons and without DP (``benchmarks/dp_utility.py``)."""
    result = record["result"]
    settings = result["settings"]
    lines = ["## Utility against privacy (DP-SGD at the sites)", "", *provenance(record)]
    lines += [
        f"FedAvg, {settings['rounds']} rounds x {settings['local_epochs']} local epochs, {settings['sites']} sites, "
        f"the validity study's data (seeds {settings['seeds']}); DP-SGD per training case with the noise planned for "
        f"each epsilon (delta {settings['delta']:g}, clipping {settings['clip']:g}); the final global model's Dice. "
        "Seconds per epoch: the slowest site's round (its validation of the global model, training and validation "
        "after each epoch) over the local epochs. Nothing tuned (the bundle's optimizer and learning rate)."
        + (f" {result['note']}" if result.get("note") else "")
        + "".join(f" {line}" for line in study_runs(result.get("runs", []))),
        "",
        "![Dice against epsilon, and without DP](images/dp_utility.png)",
        "",
    ]
    for setting, summary in result["summary"].items():
        run = next(iter(result["results"][setting].values()))
        cases = {s: v.get("training") for s, v in (run.get("cases", {}).get("sites") or {}).items()}
        lines += [f"### {setting}", "", f"Training cases per site: {cases}.", ""]
        rows = []
        for name, row in summary.items():
            lo, hi = row["mean_sites_range"]
            spread = f" ({lo:.4f}-{hi:.4f})" if lo != hi else ""
            eps = f"{row['epsilon']:.2f}" if row["epsilon"] is not None else "-"
            noise = next(iter(result["results"][setting].values()))["rows"][name].get("noise_multiplier")
            sigma = f"{max(noise.values()):.3g}" if noise else "-"
            rows.append([name, f"{row['mean_sites']:.4f}{spread}", f"{row['held_out']:.4f}", eps, sigma,
                         row["site_epoch_s"]])  # fmt: skip
        header = ["arm", "Dice, sites' validation (mean)", "Dice, held-out", "epsilon reached",
                  "noise sigma (largest site)", "s / epoch"]  # fmt: skip
        lines += [*table(header, rows), ""]
    return lines


def study_runs(runs: list[dict]) -> list[str]:
    """A record made of studies run apart (``--extend``): each run's settings, date, machine, time and note."""
    parts = []
    for run in runs:
        where = f"{run['machine']['cores']} cores ({run['machine']['cpu']})"
        head = f"{run['settings']} on {run['date'][:10]}, {where}, {run['seconds']:.0f} s"
        parts.append(f"{head}: {run['note']}" if run.get("note") else f"{head}.")
    return [f"Recorded from {len(runs)} runs of the same options:", *parts] if runs else []


def dp_signal_to_noise(record: dict) -> list[str]:
    """Why the DP arms learn nothing: one step's clipped gradient against its noise (dp_signal_to_noise.py)."""
    r = record["result"]
    lines = ["### Why: one step's signal against its noise", "", *provenance(record)]
    lines += [
        f"One real DP-SGD step of the DP network ({r['parameters']:,} weights) on a synthetic case, batch of "
        f"{r['cases_in_batch']} case: the clipped gradient has norm {r['clipped_gradient_norm']} (clipping "
        f"{r['clip']:g}); the noise added for each noise multiplier of the utility study has norm sigma x clipping x "
        "sqrt(weights). Averaging over steps shrinks the noise by sqrt(steps): it reaches the signal's size after "
        f"(noise / signal)^2 steps, against {r['study_steps_per_site']} a site takes in the study. DP-SGD at this "
        "model size needs thousands of cases per step (or far fewer weights to train), not the tens a site has here.",
        "",
    ]
    rows = [[row["sigma"], row["noise_norm"], row["noise_to_signal"], row["cosine"], f"{row['steps_to_average_out']:,}"]
            for row in r["rows"]]  # fmt: skip
    header = ["noise sigma", "noise norm", "noise / signal", "cosine(noisy, clean)", "steps to average it out"]
    return [*lines, *table(header, rows), ""]


def segment_full_size(record: dict) -> list[str]:
    r = record["result"]
    keys = ("seconds", "peak_rss_mb")
    lines = ["## Segmenting a full-size scan on the CPU", "", *provenance(record)]
    lines += [
        f"`spleen-segment` on one synthetic CT of {'x'.join(map(str, r['shape']))} voxels"
        f" ({'x'.join(map(str, r['spacing_mm']))} mm), the bundle's own inference (sliding window, inverted back to"
        " the scan's grid), mask + overlay + volume; peak = resident memory of the segmenting process. Time and"
        " memory only: the demo's model knows small synthetic phantoms, not a body of this size.",
        "",
    ]
    lines += table(["wall (s)", "peak memory (MB)"], [[r[k] for k in keys]])
    return [*lines, ""]


def gpu_check(record: dict) -> list[str]:
    r = record["result"]
    gpu, alone, fl = r["machine"], r["standalone"], r["in_fl"]
    lines = ["## On a GPU (the GPU check)", "", *provenance(record)]
    lines += [
        f"{gpu.get('gpu')} ({gpu.get('gpu_memory_gb')} GB, CUDA {gpu.get('cuda_version')}), the full bundle (96^3"
        " patches, AMP), 2 sites sharing the one GPU, synthetic scans of"
        f" {'x'.join(map(str, r['plan']['scan_shape']))} voxels at {'x'.join(map(str, r['plan']['scan_spacing']))}"
        f" mm, {r['plan']['cases_per_site']} cases per site. Standalone = MONAI's own `monai.bundle.run`, both sites"
        " side by side; in FL = the local job in the NVFlare simulator (each site trains in its own client process)."
        f" Epoch = median after the first; {r['plan']['rounds']} rounds x {r['plan']['local_epochs']} local epochs.",
        "",
    ]
    rows = [
        [
            site,
            alone[site]["epoch_s"],
            fl[site]["epoch_s"],
            round(alone[site]["epoch_s"] / fl[site]["epoch_s"], 2),
            alone[site]["gpu_peak_mb"],
            fl[site]["gpu_peak_mb"],
        ]
        for site in ("site-1", "site-2")
    ]
    lines += table(
        ["site", "epoch standalone (s)", "epoch in FL (s)", "standalone / FL", "GPU MB standalone", "GPU MB in FL"],
        rows,
    )
    seg, he = r["segment"], r["he_round"]
    busy_alone, busy_fl = alone.get("gpu_busy") or {}, fl.get("gpu_busy") or {}
    lines += [
        "",
        f"- Server round times in FL: {fl['server_round_s']} s; round overhead (round time minus the slowest site's"
        f" own validation + training): {fl['round_overhead_s']} s. The first round holds the client processes' start,"
        " CUDA's start and the caching of each site's data.",
        f"- GPU busy (SM utilization, mean / peak): standalone {busy_alone.get('sm_percent_mean')} % /"
        f" {busy_alone.get('sm_percent_max')} %, in FL {busy_fl.get('sm_percent_mean')} % /"
        f" {busy_fl.get('sm_percent_max')} %. At 5 iterations per epoch the GPU works in bursts and waits the rest"
        " of the time (data pipeline on the CPU, validation every epoch, start-up); not profiled further.",
        f"- Segmenting one {'x'.join(map(str, seg['shape']))} CT on {seg['device']}: {seg['seconds']} s, peak GPU"
        f" memory {seg['gpu_peak_mb']} MB.",
        f"- One HE round of the full-size model (CPU work, 2 sites): update {he['ours']['update_bytes'] / 1e6:.1f} MB"
        f" ({he['ours']['update_bytes'] / he['plain']['update_bytes']:.2f}x plain), encrypt {he['ours']['encrypt_s']}"
        f" s, aggregate {he['ours']['aggregate_s']} s, decrypt {he['ours']['decrypt_s']} s; round work"
        f" {he['ours']['round_s']} s (plain {he['plain']['round_s']} s).",
        f"- The whole check: {r['total_s']} s.",
    ]
    one = r.get("one_command")
    if one:
        lines += [
            f"- The one command on the same machine: `{one['command']}` ({one['system']}): {one['status']} in"
            f" {one['wall_s']} s, round times {one['round_times_s']} s, peak GPU memory per site"
            f" {', '.join(f'{k} {v} MB' for k, v in one['gpu_peak_mb'].items())}; model bundle {one['model_bundle']}.",
        ]
    return [*lines, ""]


def soak(record: dict) -> list[str]:
    r = record["result"]
    lines = ["## A soak: what grows per round", "", *provenance(record)]
    lines += [
        f"{r['rounds']} rounds of the one command on POC (tiny data, one local epoch, MLflow server), {r['wall_s']} s."
        " After each round: resident memory, open descriptors and threads of the server and of each site (the"
        " participant and all its descendants: the job process, the site's training process), and the disk of the"
        " run directory and its MLflow store. Growth = least-squares slope over rounds"
        f" {r['warmup'] + 1}-{r['rounds']}.",
        "",
    ]
    first, last = r["first"], r["last"]
    rows = []
    for name, fit in r["growth"].items():
        who, _, key = name.partition(".")
        start = first[who][key] if key else first[who]
        end = last[who][key] if key else last[who]
        rows.append([name, start, end, fit["per_round"], fit["r2"]])
    lines += table(
        ["series", f"after round {first['round']}", f"after round {last['round']}", "growth per round", "R^2"], rows
    )
    return [*lines, "", SOAK_NOTES, "", *soak_before_site_gc(r)]


def soak_before_site_gc(after: dict) -> list[str]:
    """The same soak before the sites freed memory after each round (``soak_sites_without_gc.json``), side by side."""
    path = RESULTS_DIR / "soak_sites_without_gc.json"
    if not path.is_file():
        return []
    before = json.loads(path.read_text())
    b = before["result"]
    lines = [
        "### Memory per round with and without the sites' memory_gc_rounds",
        "",
        f"Before: the same command on {before['date'][:10]} ({b['rounds']} rounds, {b['wall_s']} s), the jobs without"
        " `memory_gc_rounds` at the sites (NVFlare's Client API default 0; the server's ScatterAndGather already"
        " collected every round). After: the record above, the sites' executor with `memory_gc_rounds` 1"
        " (`gc.collect()` and glibc's `malloc_trim` after every round).",
        "",
    ]
    rows = []
    for name in ("server.rss_mb", "site-1.rss_mb", "site-2.rss_mb"):
        who, _, key = name.partition(".")
        was, now = b["growth"][name], after["growth"][name]
        rows.append(
            [
                name,
                f"{was['per_round']} (R^2 {was['r2']})",
                f"{now['per_round']} (R^2 {now['r2']})",
                f"{b['last'][who][key]} / {after['last'][who][key]}",
            ]
        )
    lines += table(
        ["series", "MB per round before", "MB per round after", "MB after the last round (before / after)"], rows
    )
    return [*lines, ""]


SOAK_NOTES = (
    "Reading it: descriptors do not grow. Threads climb for the first 30 rounds or so (about two minutes) and then"
    " stay level: they are NVFlare 2.9's streaming receiver keeping each completed stream for its retry timeout on a"
    " `threading.Timer` of its own (`fuel/f3/streaming/byte_receiver.py`, seen with py-spy: 440 of the server job's"
    " 486 threads waiting in `Timer.run`), so their number is the message rate times that timeout, not the number of"
    " rounds. Resident memory shows no trend at the server nor at the sites (R^2 near 0): the sites free memory after"
    " every round (`memory_gc_rounds` 1 in the jobs' site executor, NVFlare's Client API: `gc.collect()` and glibc's"
    " `malloc_trim`). Without it each site grew by about 0.5 MB a round with a clear trend (the table below): heap the"
    " process had freed but not handed back, since the same sites level out once it is trimmed. The run directory"
    " grows by logs (about 0.07 MB a round) until the last round, when the cross-site models land. This record was"
    " taken while a validity study shared the 2 cores (hence the longer wall time); the CI soak"
    " (`tests/e2e/test_growth_per_round.py`, 30 rounds, fitted over rounds 11-29: the last one's sample races the"
    " job's end) bounds memory (10 MB a round), descriptors (0.1) and the run directory (1 MB) per round."
)


def _seconds(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{1000 * s:.2f} ms" if s < 1 else f"{s:.1f} s"


def _mib(m: float | None) -> str:
    if m is None:
        return "–"
    return f"{1024 * m:.0f} KiB" if m < 1 else f"{m:.0f} MiB"


def _chars(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.1f} M" if n >= 1e6 else str(n)


def _outcome(row: dict | None) -> str:
    if row is None:
        return "–"
    return f"{row['outcome']} ({row['note']})" if row.get("note") else row["outcome"]


def he_malformed_update(record: dict) -> list[str]:
    result = record["result"]
    before = result.get("before", {"provenance": "not recorded", "server": {}})
    lines = ["## Malformed HE updates", "", *provenance(record)]
    lines += [
        "The updates of the security review, handed to the real `PackedHEAggregator` as a round's first update"
        " (server) and to `PackedHEDecryptor` as the global model (site): seconds = median of"
        f" {result['repeat']} runs, peak = traced memory (tracemalloc, numpy included), message = length of the"
        " refusal (the aggregator's log line, the decryptor's error). Before = the server on the code before the"
        f" fix ({before['provenance']}; not re-run); – = not measured, or no refusal. An intact update is the"
        " reference.",
        "",
    ]
    header = ["case", "server before", "server now", "time before", "time now", "peak before", "peak now"]
    header += ["message before (chars)", "message now (chars)", "site now"]
    rows = []
    for case, now in result["cases"].items():
        old, server, site = before["server"].get(case), now["server"], now["site"]
        old = old or {}
        rows.append(
            [case, _outcome(old or None), _outcome(server), _seconds(old.get("seconds")), _seconds(server["seconds"])]
        )
        rows[-1] += [_mib(old.get("peak_mib")), _mib(server["peak_mib"]), _chars(old.get("message_chars"))]
        rows[-1] += [_chars(server["message_chars"] or None), f"{site['outcome']}, {_seconds(site['seconds'])}"]
    lines += table(header, rows)
    return [*lines, ""]


def _check_reason(line: str) -> str:
    """The check's error without its "error: <file>: " prefix and its advice after the first ';'."""
    if line.startswith("error: "):
        line = line.split(": ", 2)[-1]
    return line.split(";")[0]


def nifti_bomb_check(record: dict) -> list[str]:
    result = record["result"]
    before = result.get("before", {"provenance": "not recorded", "bombs": {}})
    lines = ["## NIfTI bombs in the data check", "", *provenance(record)]
    lines += [
        "`spleen-check-data` on a one-case dataset whose image is the bomb, in a fresh process per file (the rules"
        " every site runs when a job starts and `spleen-segment` runs before inference): peak resident memory of"
        f" that process and its wall time. Before = the check before the fix ({before['provenance']}; not re-run).",
        "",
    ]
    header = ["bomb", "file (bytes)", "its header declares", "peak before (MB)", "peak now (MB)", "time before (s)"]
    header += ["time now (s)", "the check now refuses it for"]
    rows = []
    for name, now in result["bombs"].items():
        old = before["bombs"].get(name, {})
        old_peak = f"{old['peak_rss_mb']:,}" if "peak_rss_mb" in old else "–"
        if old.get("note"):
            old_peak += f" ({old['note']})"
        rows.append([name, f"{now['file_bytes']:,}", now["declares"], old_peak, now["peak_rss_mb"]])
        rows[-1] += [old.get("seconds", "–"), now["seconds"], _check_reason(now["line"])]
    lines += table(header, rows)
    return [*lines, ""]


SECTIONS = {
    "validity": validity,
    "validity_phase": validity_phase,
    "validity_phase_scaffold": validity_phase_scaffold,
    "validity_scaffold": validity_scaffold,
    "dp_utility": dp_utility,
    "dp_signal_to_noise": dp_signal_to_noise,
    "round_cost": round_cost,
    "throughput": throughput,
    "site_profile": site_profile,
    "site_scaling": site_scaling,
    "he_update_size": he_update_size,
    "he_round_time": he_round_time,
    "segment_full_size": segment_full_size,
    "he_malformed_update": he_malformed_update,
    "nifti_bomb_check": nifti_bomb_check,
    "gpu_check": gpu_check,
    "soak": soak,
}


def main() -> int:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `.venv/bin/python benchmarks/write_benchmarks_md.py` from `benchmarks/results/*.json`; each",
        "section names the command that produced its figures. `.venv/bin/python benchmarks/run_all.py` runs them all",
        "and regenerates this page (about 2 h 50 min on 2 cores). More on the HE cost: `docs/secure_and_he.md`.",
        "",
    ]
    for name, render in SECTIONS.items():
        path = RESULTS_DIR / f"{name}.json"
        if path.is_file():
            lines += render(json.loads(path.read_text()))
    OUT.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

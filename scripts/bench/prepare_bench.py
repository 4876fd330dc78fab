#!/usr/bin/env python3
"""Throughput of `taper prepare` per stage, next to datatrove's MinHash dedup and Python
tiktoken on the same input.

The input is ../shared/data/webtext-sample.jsonl replicated to at least --mb megabytes;
every copy after the first has 2% of its words replaced by random letter strings (seeded),
so copies are near-duplicates that exact dedup does not catch: a copy and the original
share about 90% of their 5-gram shingles, two copies about 80%, close to the 0.72
threshold for the shorter documents.

    python3 scripts/bench/prepare_bench.py [--mb 200] [--python .venv/bin/python]

Runs, each as its own process so that peak memory is its own:
  1. `taper prepare` (release build) with the default pipeline, on 1 and 2 threads
     (RAYON_NUM_THREADS): seconds, MB/s and documents/s of every stage, peak RSS;
  2. `taper prepare` with only the MinHash stage (14 bands x 8 rows, 5-grams) on 1 thread,
     with the default `verify: false` (datatrove's semantics: every pair sharing a band is
     joined) and with `verify: true`, and datatrove's four MinHash steps with the same
     parameters on 1 worker: seconds, documents removed, and how the clusters agree
     (taper's `--clusters` file against datatrove's `minhash_cluster_id`, documents
     matched by URL): clusters identical as sets, and pair-level agreement;
  3. tokenization: `taper prepare` with every dropping stage off, so that its tokenize
     stage (1 thread) sees every non-empty text, next to Python tiktoken's
     `encode_ordinary` (GPT-2, 1 thread) over those same texts; token counts printed
     side by side to show the inputs match.
It prints one table per part. Only ratios from one run count: the machines are shared.
Needs, in .venv: datatrove tokenizers orjson spacy "xxhash<3.6" tiktoken (xxhash 3.6+
refuses the str shingles datatrove 0.x hashes).
"""
import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("TAPER_SHARED_DATA", ROOT.parent / "shared" / "data"))


def replicate(src: Path, dst: Path, mb: int) -> tuple[int, int]:
    """Write copies of src's records to dst until it holds mb megabytes."""
    records = [json.loads(line) for line in src.open(encoding="utf-8") if line.strip()]
    rng = random.Random(1234)
    size = docs = copy = 0
    with dst.open("w", encoding="utf-8") as out:
        while size < mb * 1_000_000:
            for r in records:
                words = r.get("text", "").split(" ")
                if copy > 0 and len(words) > 10:
                    for _ in range(max(1, len(words) // 50)):
                        # letters only: MinHash shingling maps every number to "0"
                        words[rng.randrange(len(words))] = "".join(
                            rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7))
                rec = {"id": f"{r.get('id')}-{copy}", "text": " ".join(words),
                       "metadata": {"url": f"{r.get('metadata', {}).get('url', '')}?copy={copy}"}}
                line = json.dumps(rec, ensure_ascii=False) + "\n"
                out.write(line)
                size += len(line.encode("utf-8"))
                docs += 1
            copy += 1
    return size, docs


def dataset_yaml(src: Path, out: Path, minhash_only: bool, tokenize_only: bool = False,
                 verify: bool = True) -> str:
    extra = ""
    if minhash_only or tokenize_only:
        extra = """  cleaning:
    stripHtml: false
    normalizeUnicode: false
    removeBoilerplate: false
    disable: [gopherWordCount, gopherMeanWordLength, gopherSymbolRatio, gopherBulletsEllipsis,
              gopherAlphabetic, gopherStopWords, c4TerminalPunctuation, c4ShortLines,
              c4LoremIpsum, c4CurlyBraces, c4Javascript, c4Policy]
  dedup:
    url: false
    exact: false
    decontamination:
      enabled: false
"""
    if tokenize_only:
        extra += """    minhash:
      enabled: false
"""
    elif minhash_only:
        extra += f"""    minhash:
      verify: {str(verify).lower()}
"""
    return f"""apiVersion: taper.dev/v1alpha1
kind: Dataset
metadata:
  name: bench
spec:
  sources:
    - name: web
      uri: file://{src}
      format: jsonl
      urlField: metadata.url
{extra}  split:
    testSize: 0.001
  output:
    uri: file://{out}
"""


def run_taper(taper: Path, job: Path, threads: int, clusters: Path | None = None) -> tuple[dict, float, int]:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    t = time.perf_counter()
    extra = ["--clusters", str(clusters)] if clusters else []
    p = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", str(taper), "prepare", "--job", str(job), *extra],
                       env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"taper prepare failed:\n{p.stderr[-3000:]}")
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    peak = int(re.findall(r"PEAK_KB (\d+)", p.stderr)[-1])
    return stats, wall, peak


DATATROVE = r'''
import sys, time, json
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupSignature,
    MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter)
src, work = sys.argv[1], sys.argv[2]
cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
steps = [
    ("signatures", [JsonlReader(src), MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg)]),
    ("buckets", [MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets", config=cfg)]),
    ("cluster", [MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove_ids", config=cfg,
                                     save_cluster_id=True)]),
    ("filter", [JsonlReader(src), MinhashDedupFilter(input_folder=f"{work}/remove_ids", load_cluster_ids=True,
                exclusion_writer=JsonlWriter(f"{work}/removed")), JsonlWriter(f"{work}/kept")]),
]
times = {}
for name, pipeline in steps:
    tasks = cfg.num_buckets if name == "buckets" else 1
    t = time.perf_counter()
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=f"{work}/logs/{name}").run()
    times[name] = time.perf_counter() - t
import glob, gzip
removed = 0
clusters = {}
for kind in ("removed", "kept"):
    for f in glob.glob(f"{work}/{kind}/*"):
        with (gzip.open(f, "rt") if f.endswith(".gz") else open(f)) as fh:
            for line in fh:
                removed += kind == "removed"
                meta = json.loads(line)["metadata"]
                if meta.get("minhash_cluster_id", -1) >= 0:
                    clusters[meta["url"]] = meta["minhash_cluster_id"]
json.dump(clusters, open(f"{work}/clusters.json", "w"))
print("RESULT " + json.dumps({"times": times, "removed": removed}))
'''

TIKTOKEN = r'''
import sys, time, json, tiktoken, tiktoken.load
texts = json.load(open(sys.argv[1]))
# GPT-2's ranks from the file tiktoken-rs embeds (tiktoken would download it; no network here).
enc = tiktoken.Encoding(
    name="gpt2",
    pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    mergeable_ranks=tiktoken.load.load_tiktoken_bpe(sys.argv[2]),
    special_tokens={"<|endoftext|>": 50256},
)
t = time.perf_counter()
n = 0
for s in texts:
    n += len(enc.encode_ordinary(s))
dt = time.perf_counter() - t
print("RESULT " + json.dumps({"seconds": dt, "tokens": n, "bytes": sum(len(s.encode()) for s in texts)}))
'''


def read_taper_clusters(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return {r["url"]: r["cluster"] for r in map(json.loads, f)}


def agreement(ours: dict, theirs: dict) -> dict:
    """Compare two clusterings given as {url: cluster id} over the documents each put in
    a cluster of two or more (every other document is a singleton)."""
    from collections import Counter
    keys = set(ours) | set(theirs)
    a = {k: ours.get(k, ("single", k)) for k in keys}
    b = {k: theirs.get(k, ("single", k)) for k in keys}
    pairs = lambda c: sum(v * (v - 1) // 2 for v in Counter(c).values())
    same_a, same_b = pairs(a.values()), pairs(b.values())
    same_both = pairs((a[k], b[k]) for k in keys)
    groups = lambda m: {frozenset(g) for g in _groups(m).values() if len(g) > 1}
    ga, gb = groups(ours), groups(theirs)
    return {"clusters_ours": len(ga), "clusters_theirs": len(gb), "identical": len(ga & gb),
            "pair_precision": same_both / same_a if same_a else 1.0,
            "pair_recall": same_both / same_b if same_b else 1.0}


def _groups(m: dict) -> dict:
    out = {}
    for k, c in m.items():
        out.setdefault(c, set()).add(k)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args()
    src = SHARED / "webtext-sample.jsonl"
    if not src.exists():
        sys.exit(f"{src} is missing (set TAPER_SHARED_DATA)")
    print("building taper (release) ...", file=sys.stderr)
    subprocess.run(["cargo", "build", "--release", "-p", "taper-trainer"], cwd=ROOT, check=True)
    taper = ROOT / "target" / "release" / "taper"
    tmp = Path(tempfile.mkdtemp(prefix="taper-prepare-bench-"))
    try:
        corpus = tmp / "input" / "web.jsonl"
        corpus.parent.mkdir(parents=True)
        size, docs = replicate(src, corpus, a.mb)
        mb = size / 1e6
        print(f"\ninput: {mb:.0f} MB, {docs} documents ({corpus})\n")

        # 1. the default pipeline on 1 and 2 threads
        full = {}
        for threads in (1, 2):
            job = tmp / f"full-{threads}.yaml"
            job.write_text(dataset_yaml(corpus, tmp / f"out-full-{threads}", False))
            full[threads] = run_taper(taper, job, threads)
        print("taper prepare, default pipeline")
        print(f"{'stage':<14} {'docs in':>9} {'docs out':>9} | {'1 thread s':>10} {'MB/s':>7} {'docs/s':>8} | {'2 threads s':>11} {'MB/s':>7} {'docs/s':>8}")
        for i, st in enumerate(full[1][0]["stages"]):
            row = f"{st['name']:<14} {st['documentsIn']:>9} {st['documentsOut']:>9}"
            for threads in (1, 2):
                s = full[threads][0]["stages"][i]["seconds"]
                rate_mb = mb * st["documentsIn"] / max(docs, 1) / s if s > 0 else float("inf")
                row += f" | {s:>10.2f} {rate_mb:>7.1f} {st['documentsIn'] / s if s > 0 else 0:>8.0f}"
            print(row)
        for threads in (1, 2):
            stats, wall, peak = full[threads]
            print(f"end to end, {threads} thread(s): {wall:.1f} s, {mb / wall:.1f} MB/s, {docs / wall:.0f} docs/s, peak RSS {peak / 1024:.0f} MiB")
        print("(MB/s of a stage counts the input bytes of the documents that reach it, pro rata)\n")

        # 2. MinHash only: taper (datatrove's semantics, then verified) vs datatrove
        runs = {}
        for verify in (False, True):
            job = tmp / f"minhash-{verify}.yaml"
            job.write_text(dataset_yaml(corpus, tmp / f"out-minhash-{verify}", True, verify=verify))
            cfile = tmp / f"clusters-{verify}.jsonl"
            stats, wall, peak = run_taper(taper, job, 1, clusters=cfile)
            stage = next(s for s in stats["stages"] if s["name"] == "minhashDedup")
            runs[verify] = (stage, stats["dropped"].get("nearDuplicate", 0), peak, read_taper_clusters(cfile))
        dt_work = tmp / "datatrove"
        p = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", a.python, "-c", DATATROVE, str(corpus.parent), str(dt_work)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            print(f"datatrove failed:\n{p.stderr[-2000:]}")
            dt = None
        else:
            dt = json.loads(p.stdout.split("RESULT ", 1)[1].splitlines()[0])
            dt_peak = int(re.findall(r"PEAK_KB (\d+)", p.stderr)[-1])
            dt_clusters = json.loads((dt_work / "clusters.json").read_text())
        print("MinHash dedup (5-grams, 14 bands x 8 rows), 1 thread")
        print(f"{'':<30} {'seconds':>8} {'MB/s':>7} {'removed':>8} {'peak RSS MiB':>13} {'clusters':>9} {'identical':>10} {'pair prec':>10} {'pair rec':>9}")
        for verify, label in ((False, "taper (default)"), (True, "taper, verify: true")):
            stage, removed, peak, clusters = runs[verify]
            row = f"{label:<30} {stage['seconds']:>8.1f} {mb / stage['seconds']:>7.1f} {removed:>8} {peak / 1024:>13.0f}"
            if dt:
                ag = agreement(clusters, dt_clusters)
                row += f" {ag['clusters_ours']:>9} {ag['identical']:>10} {ag['pair_precision']:>10.4f} {ag['pair_recall']:>9.4f}"
            print(row)
        if dt:
            total = sum(dt["times"].values())
            n_dt = len({c for c in dt_clusters.values()})
            print(f"{'datatrove (4 steps)':<30} {total:>8.1f} {mb / total:>7.1f} {dt['removed']:>8} {dt_peak / 1024:>13.0f} {n_dt:>9}")
            print(f"  datatrove steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in dt["times"].items()))
            print(f"  datatrove / taper time: {total / runs[False][0]['seconds']:.1f}x (default), "
                  f"{total / runs[True][0]['seconds']:.1f}x (verify: true)")
            print("  identical: taper's clusters equal, as sets of documents, to one of datatrove's;")
            print("  pair prec / rec: of the document pairs taper puts in one cluster, the share datatrove")
            print("  does too, and of datatrove's pairs, the share taper has")
        print()

        # 3. tokenization, 1 thread, like for like: every stage that drops or rewrites
        # documents off, so that taper's tokenize stage and Python tiktoken see the same
        # non-empty texts (taper's count includes one end-of-text token per document).
        job = tmp / "tokenize.yaml"
        job.write_text(dataset_yaml(corpus, tmp / "out-tokenize", False, tokenize_only=True))
        tstats, _, _ = run_taper(taper, job, 1)
        texts = [t for t in (json.loads(line)["text"] for line in corpus.open(encoding="utf-8")) if t.strip()]
        tfile = tmp / "texts.json"
        tfile.write_text(json.dumps(texts))
        ranks = next(Path.home().glob(".cargo/registry/src/*/tiktoken-rs-*/assets/r50k_base.tiktoken"), None)
        p = subprocess.run([a.python, "-c", TIKTOKEN, str(tfile), str(ranks)], capture_output=True, text=True)
        tk = json.loads(p.stdout.split("RESULT ", 1)[1]) if p.returncode == 0 else None
        tok_stage = next(s for s in tstats["stages"] if s["name"] == "tokenize")
        tok_docs = tok_stage["documentsIn"]
        tok_tokens = tstats["trainTokens"] + tstats["testTokens"] - tok_docs
        tok_bytes = sum(len(t.encode()) for t in texts)
        print(f"GPT-2 tokenization, 1 thread, the same {tok_docs} texts ({len(texts)} for tiktoken)")
        print(f"{'':<26} {'seconds':>8} {'MB/s':>7} {'tokens':>12} {'tokens/s':>12}")
        print(f"{'taper (tokenize stage)':<26} {tok_stage['seconds']:>8.2f} {tok_bytes / 1e6 / tok_stage['seconds']:>7.2f} {tok_tokens:>12,} {tok_tokens / tok_stage['seconds']:>12,.0f}")
        if tk:
            print(f"{'tiktoken (Python)':<26} {tk['seconds']:>8.2f} {tk['bytes'] / 1e6 / tk['seconds']:>7.2f} {tk['tokens']:>12,} {tk['tokens'] / tk['seconds']:>12,.0f}")
            print(f"  taper / tiktoken: {tk['seconds'] / tok_stage['seconds']:.2f}x")
        else:
            print(f"tiktoken failed: {p.stderr[-1000:]}")
        print("(taper's stage includes reading each document back from the spill)")
    finally:
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The operator at scale: N PretrainJobs (1,000 by default) created at once on the e2e
suite's real control plane (etcd, kube-apiserver, kube-controller-manager with its Job
controller), with no pod runner, so trainer pods are created but never bound and stay
Pending. It reports, per PretrainJob, the latency from the PretrainJob's creation to its
Job's creation (the operator's work) and to its pod's creation (the operator's, then the
Job controller's), p50/p99, and the operator's peak RSS. Goals (issue #13): p99 < 1 s,
peak RSS < 64 MiB. It is a benchmark, not a test: it prints a table and exits 0 when the
run completed, whether or not the goals were met.

    cargo build --release -p taper-operator && cargo build -p taper-e2e
    python3 scripts/bench/operator_scale.py [--jobs 1000] [--concurrency 16] [--kcm-args '...']
        [--operator target/release/taper-operator] [--e2e-bin target/debug/taper-e2e]

How it measures. Kubernetes timestamps have a 1-second resolution, too coarse for these
goals, so the script times on the client: before creating anything it opens three watches
(PretrainJobs, and the Jobs and pods labelled `taper.dev/kind=PretrainJob`) straight
against the API server (HTTPS, the admin kubeconfig's token, read with `kubectl config
view`), and records the local monotonic time at which each object's ADDED event arrives.
Jobs and pods are keyed by their `taper.dev/job` label. A watch starts from the
resourceVersion of a list made just before it, so it misses nothing and the script knows
when it is open (no sleep-and-hope). The PretrainJobs are created by one `kubectl create
-f -` of a v1 List (kubectl sends them one after another; the time it takes is reported).

The Dataset. A PretrainJob gets a Job only once its Dataset is Ready, and the operator owns
a Dataset's status (it derives the phase from the Dataset's prepare Job, server-side
applied with force), so patching `status.phase: Ready` by hand is undone at once. Instead
the script plays the kubelet for that one pod: once the operator has created the prepare
Job and the Job controller its pod, the script marks the pod Succeeded through the pod's
status subresource (as admin). The Job controller then completes the Job and the operator
itself moves the Dataset to Ready, by its normal path. Only then are the PretrainJobs
created; their pods stay unbound.
"""
import argparse
import datetime
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode, urlparse

ROOT = Path(__file__).resolve().parents[2]
NS = "bench"
DATASET = "bench"
GOAL_P99_S = 1.0
GOAL_RSS_MIB = 64.0
PJ_RECONCILES = 'taper_operator_reconciliations_total{kind="PretrainJob"}'
PJ_SECONDS = 'taper_operator_reconcile_duration_seconds_sum{kind="PretrainJob"}'


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_kubectl():
    """kubectl from PATH (as the e2e suite runs it), else e2e/.bin/kubectl."""
    found = shutil.which("kubectl")
    if found:
        return found
    local = ROOT / "e2e" / ".bin" / "kubectl"
    if local.exists():
        return str(local)
    sys.exit("operator_scale: kubectl is neither on PATH nor in e2e/.bin")


class Kubectl:
    def __init__(self, exe, kubeconfig):
        self.exe = exe
        self.env = dict(os.environ, KUBECONFIG=str(kubeconfig))

    def run(self, *args, stdin=None, check=True, timeout=120):
        r = subprocess.run(
            [self.exe, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
        return r

    def json(self, *args):
        return json.loads(self.run(*args, "-o", "json").stdout)


class Api:
    """Minimal HTTPS access to the API server with the kubeconfig's token."""

    def __init__(self, kubectl):
        view = json.loads(kubectl.run("config", "view", "--raw", "-o", "json").stdout)
        cluster = view["clusters"][0]["cluster"]
        url = urlparse(cluster["server"])
        self.host, self.port = url.hostname, url.port or 443
        self.token = view["users"][0]["user"]["token"]
        self.ctx = ssl.create_default_context(cafile=cluster["certificate-authority"])

    def conn(self, timeout=None):
        return http.client.HTTPSConnection(
            self.host, self.port, context=self.ctx, timeout=timeout
        )

    def get(self, path, query=None):
        c = self.conn(timeout=60)
        try:
            q = f"?{urlencode(query)}" if query else ""
            c.request("GET", path + q, headers={"Authorization": f"Bearer {self.token}"})
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"GET {path}: {r.status} {body[:300]!r}")
            return json.loads(body)
        finally:
            c.close()


class Watch(threading.Thread):
    """ADDED events of a collection, each with the local monotonic time it arrived."""

    def __init__(self, api, name, path, key, label_selector=None):
        super().__init__(name=f"watch-{name}", daemon=True)
        self.api, self.label, self.path, self.key = api, name, path, key
        self.selector = label_selector
        self.first_seen = {}  # key -> monotonic seconds of its first ADDED event
        self.events = 0
        self.error = None
        self.opened = threading.Event()
        self.lock = threading.Lock()
        self.conn = None

    def open(self):
        query = {"limit": "1"}
        if self.selector:
            query["labelSelector"] = self.selector
        rv = self.api.get(self.path, query)["metadata"]["resourceVersion"]
        query = {"watch": "1", "resourceVersion": rv, "timeoutSeconds": "3600"}
        if self.selector:
            query["labelSelector"] = self.selector
        self.conn = self.api.conn()
        self.conn.request(
            "GET",
            f"{self.path}?{urlencode(query)}",
            headers={"Authorization": f"Bearer {self.api.token}"},
        )
        self.resp = self.conn.getresponse()
        if self.resp.status != 200:
            raise RuntimeError(f"watch {self.path}: {self.resp.status} {self.resp.read()[:300]!r}")
        self.start()

    def run(self):
        try:
            while True:
                line = self.resp.readline()
                now = time.monotonic()
                if not line:
                    return
                ev = json.loads(line)
                if ev.get("type") == "ERROR":
                    self.error = ev.get("object", {}).get("message", "watch error")
                    return
                if ev.get("type") != "ADDED":
                    continue
                k = self.key(ev["object"])
                with self.lock:
                    self.events += 1
                    if k is not None and k not in self.first_seen:
                        self.first_seen[k] = now
        except Exception as e:  # closed by stop(), or a broken stream
            if self.error is None and self.conn is not None:
                self.error = f"{type(e).__name__}: {e}"

    def count(self):
        with self.lock:
            return len(self.first_seen)

    def stop(self):
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def by_name(obj):
    return obj["metadata"]["name"]


def by_job_label(obj):
    return (obj["metadata"].get("labels") or {}).get("taper.dev/job")


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    rank = max(1, -(-len(s) * q // 100))  # ceil(n*q/100)
    return s[int(rank) - 1]


def proc_status(pid):
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                out[k] = int(v.split()[0]) / 1024.0  # kB -> MiB
    except OSError:
        pass
    return out


def cpu_seconds(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def children_cpu(ppid):
    """CPU seconds of each child process of `ppid`, by command name."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[1]) == ppid:
            try:  # the command's file name: /proc/*/comm cuts names at 15 characters
                argv0 = (stat.parent / "cmdline").read_bytes().split(b"\0")[0]
                name = os.path.basename(argv0.decode(errors="replace"))
            except OSError:
                name = text[text.index("(") + 1 : text.rindex(")")]
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            out[name] = out.get(name, 0.0) + cpu
    return out


def request_counts(api):
    """apiserver_request_total by (verb, resource/subresource), from the API server."""
    c = api.conn(timeout=30)
    try:
        c.request("GET", "/metrics", headers={"Authorization": f"Bearer {api.token}"})
        text = c.getresponse().read().decode()
    finally:
        c.close()
    out = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, value = line[len("apiserver_request_total{"):].rsplit("} ", 1)
        labels = dict(
            part.split("=", 1) for part in labels_text.replace('"', "").split(",") if "=" in part
        )
        res = labels.get("resource", "")
        if labels.get("subresource"):
            res += "/" + labels["subresource"]
        key = (labels.get("verb", ""), res)
        out[key] = out.get(key, 0.0) + float(value)
    return out


def http_text(addr, path, timeout=5):
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=timeout) as r:
        return r.read().decode()


def metric_sum(text, name):
    """The sum of the samples of `name`, which may include a label set."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else 0.0


def metric_lines(text, name):
    return [l for l in text.splitlines() if l.startswith(name) and l[len(name)] in " {"]


def wait_for(what, timeout, check, interval=0.25):
    deadline = time.monotonic() + timeout
    while True:
        v = check()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def stop_process(p, name, grace=60):
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log(f"{name} ignored SIGTERM for {grace} s; killing it")
        p.kill()
        p.wait()


def dataset_manifest():
    return json.dumps(
        {
            "apiVersion": "taper.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": DATASET, "namespace": NS},
            "spec": {
                "format": "pretraining",
                "sources": [{"name": "text", "uri": "s3://bench/raw/text.txt", "format": "text"}],
                "output": {"uri": "s3://bench/ds"},
            },
        }
    )


def pretrainjobs_manifest(n):
    items = [
        {
            "apiVersion": "taper.dev/v1alpha1",
            "kind": "PretrainJob",
            "metadata": {"name": f"pj-{i:04d}", "namespace": NS},
            "spec": {
                "datasetRef": {"name": DATASET},
                "model": {"preset": "tiny"},
                "resources": {"gpus": 0},
            },
        }
        for i in range(n)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def make_dataset_ready(kubectl, timeout):
    """Let the operator prepare the Dataset, playing the kubelet for its one pod."""
    kubectl.run("apply", "-f", "-", stdin=dataset_manifest())
    job = f"{DATASET}-prepare"

    def pod_name():
        r = kubectl.run(
            "get", "pods", "-n", NS, "-l", f"batch.kubernetes.io/job-name={job}",
            "-o", "jsonpath={.items[*].metadata.name}", check=False,
        )
        names = r.stdout.split()
        return names[0] if r.returncode == 0 and names else None

    pod = wait_for(f"the pod of the prepare Job {job}", timeout, pod_name)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {
        "status": {
            "phase": "Succeeded",
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now},
            ],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "image": "bench",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": 0,
                            "reason": "Completed",
                            "startedAt": now,
                            "finishedAt": now,
                        }
                    },
                }
            ],
        }
    }
    kubectl.run(
        "patch", "pod", pod, "-n", NS, "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )

    def phase():
        r = kubectl.run(
            "get", "dataset", DATASET, "-n", NS, "-o", "jsonpath={.status.phase}", check=False
        )
        return r.stdout.strip() == "Ready"

    wait_for(f"Dataset {DATASET} Ready", timeout, phase)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1000, help="PretrainJobs to create (1000)")
    ap.add_argument("--concurrency", type=int, default=16, help="TAPER_RECONCILE_CONCURRENCY (16, the default)")
    ap.add_argument("--operator", type=Path, help="taper-operator binary (default: release, else debug)")
    ap.add_argument("--e2e-bin", type=Path, default=ROOT / "target/debug/taper-e2e",
                    help="taper-e2e binary, with `up --no-runner` (target/debug/taper-e2e)")
    ap.add_argument("--timeout", type=float, default=300,
                    help="seconds to wait for every Job and pod after the create (300)")
    ap.add_argument("--kcm-args", default="",
                    help="extra kube-controller-manager flags, e.g. '--kube-api-qps=200 --kube-api-burst=400' "
                         "(its default client limit of 20 requests/s bounds how fast the Job controller creates pods)")
    ap.add_argument("--dir", type=Path, help="cluster folder, kept (default: a temporary one, removed)")
    ap.add_argument("--dump", type=Path,
                    help="write each PretrainJob's, Job's and pod's arrival time (Unix seconds) to this JSON file, "
                         "to line up with the operator's log (--rust-log)")
    ap.add_argument("--rust-log", default="warn",
                    help="the operator's RUST_LOG (warn); e.g. 'warn,kube_client=debug' logs every request "
                         "into DIR/operator.log, with --dir")
    args = ap.parse_args()
    started_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    command = " ".join(["python3", *sys.argv])

    notes = []
    operator = args.operator
    if operator is None:
        release = ROOT / "target/release/taper-operator"
        debug = ROOT / "target/debug/taper-operator"
        if release.exists():
            operator = release
        elif debug.exists():
            operator = debug
            notes.append("WARNING: no release build; measuring the DEBUG operator "
                         "(cargo build --release -p taper-operator)")
        else:
            sys.exit("operator_scale: build the operator: cargo build --release -p taper-operator")
    profile = "release" if "/release/" in str(operator.resolve()) else (
        "debug" if "/debug/" in str(operator.resolve()) else "unknown")
    if not args.e2e_bin.exists():
        sys.exit(f"operator_scale: {args.e2e_bin} is missing: cargo build -p taper-e2e")
    kubectl_exe = find_kubectl()

    own_dir = args.dir is None
    cdir = Path(tempfile.mkdtemp(prefix="taper-bench-")) if own_dir else args.dir
    cdir.mkdir(parents=True, exist_ok=True)
    up = op = None
    watches = []
    result = None
    try:
        log(f"starting the control plane (no pod runner) in {cdir}")
        up_log = open(cdir / "up.log", "w")
        up = subprocess.Popen(
            [str(args.e2e_bin), "up", "--no-runner", "--dir", str(cdir / "cluster")],
            stdout=up_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, TAPER_E2E_KCM_ARGS=args.kcm_args),
        )

        def up_ready():
            if up.poll() is not None:
                raise RuntimeError(f"taper-e2e up exited ({up.returncode}): "
                                   f"{(cdir / 'up.log').read_text()[-2000:]}")
            return "export KUBECONFIG=" in (cdir / "up.log").read_text()

        wait_for("taper-e2e up", 240, up_ready, interval=0.5)
        kubeconfig = cdir / "cluster" / "kubeconfig-admin"
        kubectl = Kubectl(kubectl_exe, kubeconfig)
        api = Api(kubectl)

        log("applying the CRDs and the namespace")
        for crd in sorted((ROOT / "charts/taper/crds").glob("*.yaml")):
            kubectl.run("apply", "--server-side", "-f", str(crd))
        kubectl.run("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/datasets.taper.dev", "crd/pretrainjobs.taper.dev",
                    "crd/finetunejobs.taper.dev")
        kubectl.run("create", "namespace", NS)

        metrics_addr = f"127.0.0.1:{free_port()}"
        health_addr = f"127.0.0.1:{free_port()}"
        env = dict(
            os.environ,
            KUBECONFIG=str(kubeconfig),
            TAPER_DEFAULT_OUTPUT_URI="s3://bench/taper",
            TAPER_LEADER_ELECTION="false",
            TAPER_WATCH_NAMESPACES=NS,
            TAPER_METRICS_ADDR=metrics_addr,
            TAPER_HEALTH_ADDR=health_addr,
            TAPER_RECONCILE_CONCURRENCY=str(args.concurrency),
            RUST_LOG=args.rust_log,
        )
        log(f"starting {operator} ({profile}), concurrency {args.concurrency}")
        op_log = open(cdir / "operator.log", "w")
        op = subprocess.Popen([str(operator)], env=env, stdout=op_log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def op_ready():
            if op.poll() is not None:
                raise RuntimeError(f"the operator exited ({op.returncode}): "
                                   f"{(cdir / 'operator.log').read_text()[-2000:]}")
            try:
                http_text(health_addr, "/readyz", timeout=1)
                return True
            except OSError:
                return False

        wait_for("the operator's /readyz", 60, op_ready)

        log("making the Dataset Ready (the operator's prepare Job, its pod marked Succeeded)")
        make_dataset_ready(kubectl, 90)

        watches = [
            Watch(api, "pretrainjobs", f"/apis/taper.dev/v1alpha1/namespaces/{NS}/pretrainjobs", by_name),
            Watch(api, "jobs", f"/apis/batch/v1/namespaces/{NS}/jobs", by_job_label,
                  "taper.dev/kind=PretrainJob"),
            Watch(api, "pods", f"/api/v1/namespaces/{NS}/pods", by_job_label,
                  "taper.dev/kind=PretrainJob"),
        ]
        for w in watches:
            w.open()
        pj_w, job_w, pod_w = watches

        base = metric_sum(http_text(metrics_addr, "/metrics"),
                          "taper_operator_reconcile_errors_total")
        cpu0 = cpu_seconds(op.pid)
        plane_cpu0 = children_cpu(up.pid)
        requests0 = request_counts(api)
        manifest = pretrainjobs_manifest(args.jobs)
        log(f"creating {args.jobs} PretrainJobs with one kubectl create")
        t_create = time.monotonic()
        kubectl.run("create", "-f", "-", stdin=manifest, timeout=600)
        t_created = time.monotonic()
        log(f"kubectl create took {t_created - t_create:.1f} s; waiting for Jobs and pods")

        deadline = t_created + args.timeout
        last = -1.0
        while time.monotonic() < deadline:
            n = (pj_w.count(), job_w.count(), pod_w.count())
            if n[1] >= args.jobs and n[2] >= args.jobs:
                break
            for w in watches:
                if not w.is_alive():
                    raise RuntimeError(f"the {w.label} watch ended: {w.error}")
            if op.poll() is not None:
                raise RuntimeError(f"the operator exited ({op.returncode})")
            if time.monotonic() - last >= 10:
                log(f"  pretrainjobs {n[0]}, jobs {n[1]}, pods {n[2]}")
                last = time.monotonic()
            time.sleep(0.2)
        time.sleep(1)  # let stragglers of the counts settle

        mem = proc_status(op.pid)
        cpu1 = cpu_seconds(op.pid)
        plane_cpu1 = children_cpu(up.pid)
        requests1 = request_counts(api)
        metrics = http_text(metrics_addr, "/metrics")
        result = dict(
            t_create=t_create,
            t_created=t_created,
            pj=dict(pj_w.first_seen),
            jobs=dict(job_w.first_seen),
            pods=dict(pod_w.first_seen),
            mem=mem,
            cpu=(cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None,
            errors=metric_sum(metrics, "taper_operator_reconcile_errors_total") - base,
            error_lines=metric_lines(metrics, "taper_operator_reconcile_errors_total"),
            reconciles=metric_lines(metrics, "taper_operator_reconciliations_total"),
            pj_reconciles=metric_sum(metrics, PJ_RECONCILES),
            pj_seconds=metric_sum(metrics, PJ_SECONDS),
            plane_cpu={k: v - plane_cpu0.get(k, 0.0) for k, v in plane_cpu1.items()},
            requests={k: v - requests0.get(k, 0.0) for k, v in requests1.items()
                      if v - requests0.get(k, 0.0) > 0},
            warnings=[l for l in (cdir / "operator.log").read_text(errors="replace").splitlines()
                      if "WARN" in l or "ERROR" in l],
        )
    finally:
        for w in watches:
            w.stop()
        log("stopping the operator and the control plane")
        stop_process(op, "taper-operator", 30)
        stop_process(up, "taper-e2e up", 60)
        if own_dir and result is not None:
            shutil.rmtree(cdir, ignore_errors=True)
        elif own_dir:
            log(f"kept {cdir} (logs) after a failed run")

    if args.dump and result is not None:
        wall = time.time() - time.monotonic()
        args.dump.write_text(json.dumps({
            kind: {k: v + wall for k, v in result[kind].items()} for kind in ("pj", "jobs", "pods")
        }))
    report(args, result, command, started_at, operator, profile, notes, cdir)


def report(args, r, command, started_at, operator, profile, notes, cdir):
    n = args.jobs
    pj, jobs, pods = r["pj"], r["jobs"], r["pods"]
    job_lat = [jobs[k] - pj[k] for k in pj if k in jobs]
    pod_lat = [pods[k] - pj[k] for k in pj if k in pods]
    first = min(pj.values()) if pj else r["t_create"]

    def secs(v):
        return f"{v:.3f} s" if v is not None else "n/a"

    def pct(vals, q):
        return percentile(vals, q) if vals else None

    rows = []

    def row(metric, value, goal="", met=""):
        rows.append((metric, value, goal, met))

    def verdict(v, limit):
        return "" if v is None else ("yes" if v < limit else "NO")

    row("PretrainJobs created (seen by watch)", f"{len(pj)}/{n}")
    row("kubectl create of all (serial POSTs)", secs(r["t_created"] - r["t_create"]))
    row("Jobs created", f"{len(job_lat)}/{n}", f"{n}/{n}", "yes" if len(job_lat) == n else "NO")
    for q in (50, 99):
        v = pct(job_lat, q)
        row(f"create -> Job created p{q}", secs(v), "< 1 s" if q == 99 else "",
            verdict(v, GOAL_P99_S) if q == 99 else "")
    row("create -> Job created max", secs(max(job_lat) if job_lat else None))
    row("all Jobs exist, from first create",
        secs(max(jobs.values()) - first if len(jobs) >= n else None))
    row("pods created", f"{len(pod_lat)}/{n}", f"{n}/{n}", "yes" if len(pod_lat) == n else "NO")
    for q in (50, 99):
        v = pct(pod_lat, q)
        row(f"create -> pod created p{q}", secs(v), "< 1 s" if q == 99 else "",
            verdict(v, GOAL_P99_S) if q == 99 else "")
    row("create -> pod created max", secs(max(pod_lat) if pod_lat else None))
    row("all pods exist, from first create",
        secs(max(pods.values()) - first if len(pods) >= n else None))
    hwm = r["mem"].get("VmHWM")
    row("operator peak RSS (VmHWM)", f"{hwm:.1f} MiB" if hwm else "n/a", "< 64 MiB",
        verdict(hwm, GOAL_RSS_MIB))
    rss = r["mem"].get("VmRSS")
    row("operator RSS at the end (VmRSS)", f"{rss:.1f} MiB" if rss else "n/a")
    row("operator CPU time during the run", secs(r["cpu"]))
    for name, cpu in sorted(r["plane_cpu"].items()):
        row(f"{name} CPU time during the run", secs(cpu))
    total = sum(r["requests"].values())
    row("API requests served during the run", f"{total:.0f} ({total / max(1, len(pj)):.1f} per PretrainJob)")
    row("PretrainJob reconciles (per PretrainJob)",
        f"{r['pj_reconciles']:.0f} ({r['pj_reconciles'] / max(1, len(pj)):.1f})")
    row("mean PretrainJob reconcile duration",
        secs(r["pj_seconds"] / r["pj_reconciles"] if r["pj_reconciles"] else None))
    row("reconcile errors during the run", f"{r['errors']:.0f}")
    row("operator log lines at WARN/ERROR", str(len(r["warnings"])))

    print(f"# Taper operator scale benchmark, {started_at}")
    print(f"# command:  {command}")
    print(f"# operator: {operator} (profile: {profile}), reconcile concurrency "
          f"{args.concurrency}, RUST_LOG={args.rust_log}")
    print(f"# cluster:  taper-e2e up --no-runner (etcd, kube-apiserver, "
          f"kube-controller-manager; pods unbound), {os.cpu_count()} CPUs; "
          f"kube-controller-manager flags: {args.kcm_args or 'defaults (client limit 20 requests/s)'}")
    print("# latency: from the PretrainJob's ADDED watch event to its Job's / pod's, "
          "timed on the client")
    for note in notes:
        print(f"# {note}")
    widths = [max(len(str(x[i])) for x in rows + [("metric", "value", "goal", "met")])
              for i in range(4)]
    line = " | ".join
    print(line(h.ljust(w) for h, w in zip(("metric", "value", "goal", "met"), widths)))
    print("-+-".join("-" * w for w in widths))
    for rw in rows:
        print(line(str(c).ljust(w) for c, w in zip(rw, widths)))
    print()
    # When the slowest Jobs were asked for: a tail at the start, at the end or in bursts.
    slow = sorted((jobs[k] - pj[k], pj[k] - first) for k in pj if k in jobs)[-12:]
    print("# slowest Jobs, latency @ PretrainJob created (s after the first): "
          + ", ".join(f"{lat:.2f} @ {at:.1f}" for lat, at in reversed(slow)))
    top = sorted(r["requests"].items(), key=lambda kv: -kv[1])[:24]
    print("# API requests during the run, by verb and resource: " + ", ".join(
        f"{verb} {res} {n:.0f}" for (verb, res), n in top))
    for l in r["reconciles"] + r["error_lines"]:
        print(f"# {l}")
    for l in r["warnings"][:5]:
        print(f"# operator: {l[:300]}")
    if not args.dir:
        return
    print(f"# logs kept in {cdir}")


if __name__ == "__main__":
    main()

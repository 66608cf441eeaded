"""The small programs ``bench_moe_convert.py`` runs in measured processes (kept as text: each runs in a
fresh interpreter): the RSS hook every measured process loads, the import and export floors, the baseline
that measures what imports alone cost."""

#: Written to <work>/hook/sitecustomize.py and put first on PYTHONPATH of every measured process.
HOOK = r'''
import atexit, os, json, threading, time
_dir = os.environ.get("BENCH_MOE_RSS_DIR")
if _dir:
    _t0, _samples = time.time(), []
    def _status(*fields):
        out = {}
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    k = line.split(":", 1)[0]
                    if k in fields:
                        out[k] = int(line.split()[1])
        except OSError:
            pass
        return out
    def _sample():
        while True:
            _samples.append((round(time.time() - _t0, 3), _status("VmRSS").get("VmRSS", 0)))
            time.sleep(0.05)
    threading.Thread(target=_sample, daemon=True).start()
    def _report():
        s = _status("VmHWM", "VmRSS")
        rec = {"pid": os.getpid(), "ppid": os.getppid(), "rank": os.environ.get("RANK"),
               "world": os.environ.get("WORLD_SIZE"), "hwm_kb": s.get("VmHWM", 0), "start": _t0,
               "end": time.time(), "samples": _samples[:]}
        with open(os.path.join(_dir, f"{os.getpid()}.json"), "w") as f:
            json.dump(rec, f)
    atexit.register(_report)
'''

FLOOR_IMPORT = r'''
import json, os, struct, sys, time
t0 = time.perf_counter()
import torch
from safetensors.torch import save_file
DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
t1 = time.perf_counter()
src, out = sys.argv[1], sys.argv[2]
with open(sys.argv[3]) as f:
    plan = json.load(f)
tensors, nbytes = {}, 0
for shard, names in plan["read"].items():
    with open(os.path.join(src, shard), "rb", buffering=0) as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(length))
        for name in names:  # plain reads into fresh memory: the bytes land in this process's memory
            entry = entries[name]
            begin, end = entry["data_offsets"]
            t = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
            f.seek(8 + length + begin)
            view, done = memoryview(t.view(-1).view(torch.uint8).numpy()), 0
            while done < end - begin:
                done += f.readinto(view[done:])
            nbytes += done
            tensors[name] = t
t2 = time.perf_counter()
keep = set(plan["write"])
path = os.path.join(out, f"rank{plan['rank']}.safetensors")
save_file({k: v for k, v in tensors.items() if k in keep}, path)
fd = os.open(path, os.O_RDONLY); os.fsync(fd); os.close(fd)
t3 = time.perf_counter()
print("@@FLOOR@@ " + json.dumps({"imports": t1 - t0, "read": t2 - t1, "write": t3 - t2, "bytes_read": nbytes,
                                 "bytes_written": os.path.getsize(path)}), flush=True)
'''

FLOOR_EXPORT = r'''
import glob, json, os, sys, time
t0 = time.perf_counter()
import torch
from safetensors.torch import save_file
t1 = time.perf_counter()
meg, out = sys.argv[1], sys.argv[2]
with open(sys.argv[3]) as f:
    plan = json.load(f)
files = sorted(glob.glob(os.path.join(meg, "**", "*.distcp"), recursive=True))
dtypes = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
shards, current, handle, nbytes = [], {}, None, 0
def next_handle():
    global handle
    if handle is not None:
        handle.close()
    handle = open(files.pop(0), "rb", buffering=0)
next_handle()
for shard in plan["shards"]:  # the HF tensors, in the export's shards; their bytes come from the megatron files
    tensors = {}
    for name, dtype, shape in shard:
        t = torch.empty(shape, dtype=dtypes[dtype])
        view, done = memoryview(t.view(-1).view(torch.uint8).numpy()), 0
        while done < len(view):
            n = handle.readinto(view[done:])
            if not n:
                next_handle()
            done += n or 0
        nbytes += done
        tensors[name] = t
    shards.append(tensors)
handle.close()
t2 = time.perf_counter()
os.makedirs(out)
for i, tensors in enumerate(shards):
    save_file(tensors, os.path.join(out, f"model-{i:05d}.safetensors"), metadata={"format": "pt"})
t3 = time.perf_counter()
print("@@FLOOR@@ " + json.dumps({"imports": t1 - t0, "read": t2 - t1, "write": t3 - t2, "bytes_read": nbytes,
                                 "bytes_written": sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))}),
      flush=True)
'''

#: What a converting process has resident before it converts: plugtron's plugins, torch and megatron-core imported.
BASELINE = r'''
import gc
from plugtron.manager import get_plugin_manager
get_plugin_manager()
from plugtron_hf_bridge.libraries import import_megatron
import_megatron()
from plugtron_hf_bridge import checkpoint, exporter, importer  # noqa: F401
from plugtron.runtime.parallel import initialize_parallel
initialize_parallel()
gc.freeze()
'''

import time, torch, numpy as np, streamspec, warnings, sys
from torch import nn
from bench.harness import CONFIGS, build_model
from streamspec.sketch import tracker
torch.set_num_threads(2); warnings.simplefilter("ignore")
cfg = CONFIGS["cpu"]
def run(variant):
    model = build_model(cfg, torch.device("cpu")); opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.randn(16, 64, 256); labels = torch.arange(16) % 2
    mon = None
    if variant != "plain":
        mon = streamspec.watch(model, ["a", "b"], rank=16, live=False)
        mon._pipeline.submit = lambda item: None
        if variant == "no-tracker":
            for t in mon._trackers:
                t.step = lambda a, d, exact, tie=None: tracker.StepSketch("exact", {})
    ts = []
    for i in range(10):
        t = time.perf_counter()
        if mon: mon.label(labels)
        loss = nn.functional.mse_loss(model(x), x); opt.zero_grad(); loss.backward(); opt.step()
        ts.append(time.perf_counter() - t)
    if mon: mon.close()
    return np.median(ts[3:]) * 1e3
for v in ["plain", "no-tracker", "full", "plain", "no-tracker", "full"]:
    print(v, "%.1f ms" % run(v))

"""Put MDN into a MONAI network you did not write: a 3-D ResNet-18 on multi-site volumes.

The last stage's BatchNorms are replaced by MDN layers and one more MDN layer is inserted on the
pooled features before the classifier (where the paper puts it); the converted model is called as
``model(x, metadata=rows)``. Random volumes stand in for MRI: the site shifts their intensity.

    pip install "metanorm[monai]"
    python examples/monai_convert.py --subjects 36 --steps 4
"""

import argparse
import io
import json

import numpy as np
import torch
from monai.networks.nets import resnet18
from torch import nn

import metanorm as mn
from metanorm.metrics import grouped_distance_correlation_sqr

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--subjects", type=int, default=36)
parser.add_argument("--side", type=int, default=16, help="volume side (voxels)")
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--batch-size", type=int, default=12)
args = parser.parse_args()
torch.manual_seed(0)
rng = np.random.default_rng(0)

# subjects: diagnosis y, a site (3 scanners, associated with y) and an age
n = args.subjects
y = rng.integers(0, 2, n)
site = np.where(rng.random(n) < 0.7, y, rng.integers(0, 3, n))
age = rng.normal(60, 8, n)
volumes = torch.randn(n, 1, args.side, args.side, args.side)
volumes += torch.as_tensor(0.5 * site + 0.02 * (age - 60), dtype=torch.float32).view(n, 1, 1, 1, 1)
volumes[y == 1, :, : args.side // 2] += 0.3  # the diagnosis effect

design = mn.make_design(
    {"y": y, "site": site.astype(str), "age": age}, keep=["y"], categorical=["site"]
)
rows = design.tensor()  # (n, K) design rows: y kept; site, age and the intercept removed

net = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, pretrained=False)
last_stage = [
    name
    for name, m in net.named_modules()
    if name.startswith("layer4.") and isinstance(m, nn.BatchNorm3d)
]
model = mn.nn.convert_metadata_norm(net, design, replace=last_stage, after=["avgpool"])

loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(volumes, torch.as_tensor(y), rows),
    batch_size=args.batch_size,
    shuffle=True,
    drop_last=True,  # every batch larger than K, so each step uses its own β estimate
)
opt = None
step = 0
while step < args.steps:
    for xb, yb, rb in loader:
        loss = nn.functional.cross_entropy(model(xb, metadata=rb), yb)
        if opt is None:  # the MDN layers are sized by the first batch: build the optimiser after
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step == args.steps:
            break
print(f"trained {step} steps, last loss {loss.item():.3f}")

mn.nn.utils.refit_running_beta(model, loader)  # the evaluation β, fitted to the final weights
model.eval()
eval_rows = rows.clone()
eval_rows[:, list(design.keep)] = 0  # evaluation needs no labels
features = {}
model.module.fc.register_forward_pre_hook(lambda mod, inp: features.__setitem__("x", inp[0]))
with torch.no_grad():
    logits = model(volumes, metadata=eval_rows)
site_onehot = rows[:, 1:3]  # the design columns site=1, site=2
bias = grouped_distance_correlation_sqr(
    features["x"], site_onehot, torch.as_tensor(y), unbiased=True
)
print(
    "per-class dcor² of the pooled features with the site:",
    {k: round(v, 3) for k, v in bias.items()},
)

# save and restore into a fresh converted network without the design: the empty lazy layers of
# K columns take their width, kept columns, Σ⁻¹ and N from the checkpoint
buffer = io.BytesIO()
torch.save(model.state_dict(), buffer)
fresh = mn.nn.convert_metadata_norm(
    resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, pretrained=False),
    None,
    num_metadata=design.shape[1],
    replace=last_stage,
    after=["avgpool"],
)
buffer.seek(0)
fresh.load_state_dict(torch.load(buffer))
fresh.eval()
with torch.no_grad():
    diff = (fresh(volumes, metadata=eval_rows) - logits).abs().max().item()
print(f"restored model: max |Δ logits| = {diff:.2e}")
layers = sum(isinstance(m, mn.MetadataNorm) for m in model.modules())
print("RESULT " + json.dumps({"mdn_layers": layers, "restored_max_diff": diff, "dcor2": bias}))

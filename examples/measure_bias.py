"""Measuring the bias of a trained model: how much does a confounder stay in its features?

A small MLP (no MDN) is trained on data where a confounder cf goes with the label and leaks into
the inputs. A forward hook collects its penultimate features over a validation loader; dcor²
between those features and cf within each class (the paper's bias metric) and the balanced
accuracy are accumulated batch by batch, and a permutation test says whether the dependence left
is real. Run: python examples/measure_bias.py [--samples N] [--permutations B]
"""

import argparse
import json

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from metanorm.metrics import (
    BalancedAccuracy,
    GroupedDistanceCorrelationSqr,
    distance_correlation_test,
)


def make_data(n, g):
    y = torch.randint(0, 2, (n,), generator=g)
    cf = torch.rand(n, generator=g) * 3 + 1 + 2 * y  # U(1,4) for class 0, U(3,6) for class 1
    x = torch.randn(n, 12, generator=g)
    x[:, :3] += y[:, None]  # the label's own signal ...
    x[:, 3:] += cf[:, None] * torch.linspace(-1, 1, 9)  # ... and the confounder's leak
    return TensorDataset(x, y, cf)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--samples", type=int, default=1000, help="training (and validation) samples"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--permutations", type=int, default=199)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the models")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    train_loader = DataLoader(make_data(args.samples, g), batch_size=64, shuffle=True)
    val_loader = DataLoader(make_data(args.samples, g), batch_size=256)
    model = nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.epochs):  # any trained model will do; this one learns the shortcut
        for x, y, _cf in train_loader:
            loss = nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y.float())
            opt.zero_grad()
            loss.backward()
            opt.step()

    # the features to measure: the penultimate block's output, caught by a forward hook
    # (for a model with MDN layers, call model(x, design_rows) below instead)
    features = []
    hook = model[3].register_forward_hook(lambda module, inputs, output: features.append(output))
    bias = GroupedDistanceCorrelationSqr(unbiased=True)  # dcor² within each class
    bacc = BalancedAccuracy()
    model.eval()
    with torch.no_grad():
        for x, y, cf in val_loader:
            logits = model(x)
            bias.update(features[-1], cf, y)  # features, metadata, groups (the classes)
            bacc.update(y, (logits[:, 0] > 0).long())
    hook.remove()
    dcor2 = bias.compute()  # {class: dcor²}
    print(f"validation bAcc {bacc.compute():.3f}")

    # is the dependence left real? A permutation test of independence within each class, with
    # a control: the inputs' label dimensions, which carry no cf within a class
    features = torch.cat(features)  # the loader does not shuffle: rows in dataset order
    inputs, labels, confounder = val_loader.dataset.tensors
    result = {"bacc": bacc.compute(), "dcor2": dcor2, "pvalue": {}, "control_pvalue": {}}
    for c, value in dcor2.items():
        rows = labels == c
        kw = {"num_permutations": args.permutations, "unbiased": True, "random_state": 0}
        p = distance_correlation_test(features[rows], confounder[rows], **kw).pvalue
        p0 = distance_correlation_test(inputs[rows, :3], confounder[rows], **kw).pvalue
        print(f"class {c}: dcor²(features, cf) {value:.3f}, p-value {p:.3f} (control: {p0:.3f})")
        result["pvalue"][c], result["control_pvalue"][c] = p, p0
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

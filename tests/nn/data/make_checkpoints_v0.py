"""Writes tests/nn/data/checkpoints_v0.pt: checkpoints of every MDN layer of metanorm 0.1.

Run once, with the code before the layers moved onto one base; the tests load its output with the
current classes. Kept as the record of how the fixture was made (it imports names of that code).
"""

if __name__ == "__main__":
    import numpy as np
    import torch
    from torch import nn

    import metanorm as mn
    from metanorm.design import make_design
    from metanorm.models.interaction_norms import MetadataScaleNorm, PolynomialMetadataNorm
    from metanorm.nn import (
        MetadataNorm,
        PenaltyMetadataNorm,
        RecursiveMetadataNorm,
        SyncMetadataNorm,
        convert_metadata_norm,
    )

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 60
    y = rng.integers(0, 2, n)
    c = rng.uniform(1, 6, n) + y
    design = make_design({"y": y, "c": c}, keep=["y"])
    rows = design.tensor().float()
    rows64 = design.tensor().double()
    out = {}

    def run(layer, feats, r, steps=3, bs=20):
        layer.train()
        for i in range(steps):
            layer(feats[i * bs : (i + 1) * bs], r[i * bs : (i + 1) * bs])
        return layer

    def record(name, layer, init, probe, r, **extra):
        layer.eval()
        with torch.no_grad():
            expected = layer(probe, r)
        sd = layer.state_dict()
        out[name] = {
            "state_dict": sd,
            "init": init,
            "probe": probe,
            "rows": r,
            "expected_eval": expected,
            "version": sd._metadata[""].get("version"),
            **extra,
        }

    d = 6
    feats = torch.randn(n, d) + rows[:, 1:2]
    feats64 = feats.double()
    # MetadataNorm, float64, keep y
    layer = run(MetadataNorm(d, design, dtype=torch.float64), feats64, rows64)
    record(
        "metadata_norm",
        layer,
        {"num_features": d, "num_metadata": 3, "dtype": "float64"},
        torch.randn(7, d, dtype=torch.float64),
        rows64[:7],
    )
    # channel-wise, float32
    fmap = torch.randn(n, 4, 3, 3) + rows[:, 1:2, None, None]
    layer = run(MetadataNorm(4, design, channelwise=True), fmap, rows)
    record(
        "metadata_norm_channelwise",
        layer,
        {"num_features": 4, "num_metadata": 3, "channelwise": True},
        torch.randn(5, 4, 3, 3),
        rows[:5],
    )
    # momentum None
    layer = run(MetadataNorm(d, design, momentum=None), feats, rows)
    record(
        "metadata_norm_cumulative",
        layer,
        {"num_features": d, "num_metadata": 3, "momentum": None},
        torch.randn(5, d),
        rows[:5],
    )
    # Sync (one process) state
    layer = run(SyncMetadataNorm(d, design), feats, rows)
    record(
        "sync_metadata_norm",
        layer,
        {"num_features": d, "num_metadata": 3},
        torch.randn(5, d),
        rows[:5],
    )
    # Recursive
    layer = run(RecursiveMetadataNorm(d, 3, keep=[0]), feats, rows)
    record(
        "recursive",
        layer,
        {"num_features": d, "num_metadata": 3, "keep": [0]},
        torch.randn(5, d),
        rows[:5],
    )
    # Penalty
    layer = run(PenaltyMetadataNorm(d, 3, keep=[0]), feats, rows)
    record(
        "penalty",
        layer,
        {"num_features": d, "num_metadata": 3, "keep": [0]},
        torch.randn(5, d),
        rows[:5],
    )
    # Scale (harness)
    layer = run(MetadataScaleNorm(4, design), fmap.abs() + 0.1, rows)
    record(
        "scale", layer, {"num_channels": 4, "num_metadata": 3}, torch.randn(5, 4, 3, 3), rows[:5]
    )
    # Polynomial (harness)
    layer = run(PolynomialMetadataNorm(d, design), feats, rows)
    record("polynomial", layer, {"num_features": d}, torch.randn(5, d), rows[:5])
    # a converted model
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    model = convert_metadata_norm(net, design, replace=[nn.BatchNorm1d], after=["2"])
    x = torch.randn(n, 3)
    model.train()
    for i in range(3):
        model(x[i * 20 : (i + 1) * 20], metadata=rows[i * 20 : (i + 1) * 20])
    model.eval()
    probe = torch.randn(5, 3)
    with torch.no_grad():
        expected = model(probe, metadata=rows[:5])
    out["converted_model"] = {
        "state_dict": model.state_dict(),
        "probe": probe,
        "rows": rows[:5],
        "expected_eval": expected,
        "init": {"replace": "BatchNorm1d", "after": ["2"]},
    }
    out["design_matrix"] = torch.as_tensor(design.matrix)
    out["design_columns"] = list(design.columns)
    out["written_by"] = "metanorm " + mn.__version__ + ", torch " + torch.__version__
    torch.save(out, "tests/nn/data/checkpoints_v0.pt")
    print(
        {
            k: (v["version"] if isinstance(v, dict) and "version" in v else "")
            for k, v in out.items()
        }
    )
    print({k: list(v["state_dict"]) for k, v in out.items() if isinstance(v, dict)})

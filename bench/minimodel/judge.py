"""Style judge: a small CNN classifier over all 30 styles (held-out ones included), and KID.

Metrics for a generated image set and a target style:

* **style accuracy** — the fraction of generated images the judge assigns to the target style;
* **KID** — kernel inception distance, here in the judge's 64-d penultimate feature space (the
  Inception network of the usual KID knows nothing about 32 px glyphs and needs weights we cannot
  download): the unbiased MMD^2 estimator with the polynomial kernel k(x, y) = (x.y / d + 1)^3
  (Binkowski et al. 2018). Written out (``kid``) because torchmetrics is not installed and its
  KID is tied to the Inception feature extractor (torch-fidelity) anyway.

The judge is trained on rendered images of every style (indices disjoint from the private sets
and the KID reference sets, ``data.JUDGE_OFFSET``), half of them passed through the mini model's
VAE, so VAE blur (which every generated image has) is not mistaken for a style change.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import data

FEATURE_DIM = 64


class Judge(nn.Module):
    def __init__(self, n_classes: int = len(data.STYLES)) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(3, 32),
            *block(32, 32),
            nn.AvgPool2d(2),
            *block(32, 64),
            *block(64, 64),
            nn.AvgPool2d(2),
            *block(64, FEATURE_DIM),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.float()
    return data.to_tensor(list(images))


@torch.no_grad()
def vae_roundtrip(vae: Any, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = []
    for s in range(0, len(x), batch):
        out.append(vae.decode(vae.encode(x[s : s + batch]).latent_dist.mean).sample.clamp(-1, 1))
    return torch.cat(out)


def judge_set(per_style: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for k, style in enumerate(data.STYLES):
        exs = data.style_examples(style, per_style, offset=offset)
        xs += [e.image for e in exs]
        ys += [k] * len(exs)
    return data.to_tensor(xs), torch.tensor(ys)


def train_judge(
    vae: Any = None,
    *,
    per_style: int = 100,
    steps: int = 600,
    batch: int = 64,
    seed: int = 0,
    log: bool = True,
) -> Judge:
    torch.manual_seed(seed)
    x, y = judge_set(per_style, data.JUDGE_OFFSET)
    x_rec = vae_roundtrip(vae, x) if vae is not None else x
    model = Judge()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    model.train()
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        use_rec = torch.rand(batch, generator=gen) < 0.5
        xb = torch.where(use_rec.view(-1, 1, 1, 1), x_rec[idx], x[idx])
        xb = xb + 0.05 * torch.randn(xb.shape, generator=gen)
        loss = nn.functional.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step % 100 == 0 or step == steps - 1):
            print(f"judge step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    return model.eval()


@torch.no_grad()
def features(judge: Judge, images: np.ndarray | torch.Tensor) -> np.ndarray:
    x = _to_input(images)
    return torch.cat([judge.features(x[s : s + 256]) for s in range(0, len(x), 256)]).numpy()


@torch.no_grad()
def predict(judge: Judge, images: np.ndarray | torch.Tensor) -> np.ndarray:
    x = _to_input(images)
    return torch.cat([judge(x[s : s + 256]).argmax(1) for s in range(0, len(x), 256)]).numpy()


def style_accuracy(judge: Judge, images: np.ndarray, style: str) -> float:
    return float(np.mean(predict(judge, images) == data.style_index(style)))


def kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between feature sets x [m, d] and y [n, d], kernel (x.y/d + 1)^3.

    E_hat = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(n(n-1)) - 2 mean k(x_i,y_j);
    unbiased, so it can be slightly negative when the distributions match."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m, n, d = len(x), len(y), x.shape[1]
    if m < 2 or n < 2:
        raise ValueError("kid needs at least two samples on each side")
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )


def save_judge(judge: Judge, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(path))
    return path


def load_judge(path: str | Path) -> Judge:
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict(load_file(str(path)))
    return judge.eval()


def evaluate_judge(judge: Judge, vae: Any = None, per_style: int = 20) -> dict[str, float]:
    """Accuracy on fresh rendered images (clean, and through the VAE), overall and held-out."""
    x, y = judge_set(per_style, data.JUDGE_TEST_OFFSET)
    held = torch.tensor([data.STYLES[int(k)] in data.HELD_OUT for k in y])
    out = {}
    sets = {"clean": x}
    if vae is not None:
        sets["vae"] = vae_roundtrip(vae, x)
    for name, xs in sets.items():
        pred = torch.from_numpy(predict(judge, xs))
        out[f"acc_{name}"] = float((pred == y).float().mean())
        out[f"acc_{name}_held_out"] = float((pred[held] == y[held]).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    """Train the judge against the mini model in ``--cache`` and save ``judge.safetensors``."""
    import argparse
    import json

    from dpagg_core.showcase.minimodel import pipeline_from_single_file

    ap = argparse.ArgumentParser(description="train the style judge")
    ap.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / "cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = pipeline_from_single_file(args.cache / "minimodel.safetensors")
    judge = train_judge(pipe.vae, steps=args.steps, seed=args.seed)
    path = save_judge(judge, args.cache / "judge.safetensors")
    metrics = evaluate_judge(judge, pipe.vae)
    (args.cache / "judge_info.json").write_text(json.dumps(metrics, indent=2))
    print(f"saved {path}: {metrics}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A/B of the VAE's SSIM loss term (issue 2: "add a structural term if it measurably helps").

Trains only the VAE stage of the ``small`` preset twice (SSIM weight 0 and 0.2; same seed, 500 steps,
32 px PneumoniaMNIST train split, one thread) and scores reconstructions of the validation split.

    OMP_NUM_THREADS=1 python scripts/bench_vae_ssim.py

It drives ``Trainer``'s VAE stage directly (private methods), writing scratch files under /tmp.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time  # noqa: E402
import numpy as np
import torch
torch.set_num_threads(1)
from generator.ingest import load_dataset
from generator.config import get_preset
from generator.training import Trainer, _Log
from generator.evaluation import psnr, ssim
npz = Path(__file__).resolve().parents[2] / "shared/data/pneumoniamnist/pneumoniamnist_trainval.npz"
lt={0:'normal',1:'pneumonia'}
tr=load_dataset(npz, resolution=32, label_text=lt, progress=False)
va=load_dataset(npz, resolution=32, label_text=lt, npz_split='val', progress=False)
xv=torch.from_numpy(va.stack()*2-1).unsqueeze(1)
for w in [0.0, 0.2]:
    out=Path(f'/tmp/ab_{w}')
    t=Trainer(tr, out, get_preset('small', vae_ssim_weight=w), resolution=32, max_steps=500, progress=False, seed=0)
    t._run_start=time.monotonic(); out.mkdir(exist_ok=True); (out/'checkpoints').mkdir(exist_ok=True)
    t.log=_Log(out/'log.csv', True, False)
    vae,_=t._train_vae(t._pixels())
    with torch.no_grad():
        rec=vae.decode(vae.encode(xv).latent_dist.mean).sample
    a=((xv[:,0]+1)/2).numpy(); b=((rec[:,0].clamp(-1,1)+1)/2).numpy()
    print(f"ssim_weight {w}: PSNR {psnr(a,b):.2f} dB, SSIM {ssim(a,b):.4f}, MAE {np.abs(a-b).mean():.4f}", flush=True)

"""Run ../shared/peers/ref_cellpose.py with Cellpose's training passes under bf16 autocast.

cellseg trains here in bf16 (`trainer.precision=bf16-mixed`); the peer script trains Cellpose in
fp32 (through MKLDNN): 6.3-8.6 s a forward+backward pass of 8 x 224^2 on this 2-core CPU, against
2.8 s under torch.autocast(bfloat16), so its fair budget (1,570 batches) would take about 4 hours.
Nothing else changes: same data, split, augmentation, schedule, seed and loss (computed in fp32);
the test loss and every prediction still run in fp32.

Usage, with the Cellpose venv (the arguments are the peer script's):
  /work/peer-cp/bin/python scripts/cellpose_bf16.py PRED_DIR --nimg-per-epoch 8 --epochs 1570 ...
PEER_SCRIPT names the peer script (default ../shared/peers/ref_cellpose.py beside this repository).
CELLPOSE_RESUME_BATCHES=N continues a run stopped after N batches from the weights it saved last
(it saves every 5 batches, after batch 5k+1): it trains the remaining --epochs minus N batches with
a fresh optimizer, from cellpose's 10-batch warm-up to the same final learning-rate decay;
cellpose seeds each batch with its index, so these repeat the first batches' images and crops.
CELLPOSE_AUGMENT=1 predicts with cellpose's test-time augmentation (``eval(augment=True)``: "tiles
image with overlapping tiles and flips overlapped regions to augment"), the peer of cellseg's
``inference.tta=true``; with --skip-seg it re-predicts a trained model.
"""

import os
import runpy
import sys

import torch
from cellpose import models, resnet_torch, train

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.environ.get(
    "PEER_SCRIPT", os.path.join(HERE, "..", "..", "shared", "peers", "ref_cellpose.py")
)
RESUME = int(os.environ.get("CELLPOSE_RESUME_BATCHES", "0"))
AUGMENT = os.environ.get("CELLPOSE_AUGMENT", "0") == "1"
fp32_forward = resnet_torch.CPnet.forward
train_seg = train.train_seg
cellpose_eval = models.CellposeModel.eval


def augmented_eval(self, x, **kwargs):
    return cellpose_eval(self, x, **{**kwargs, "augment": True})


def forward(self, data):
    if not self.training:
        return fp32_forward(self, data)
    mkldnn, self.mkldnn = self.mkldnn, False  # MKLDNN tensors have no bf16 autocast path
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            flows, style, downs = fp32_forward(self, data)
    finally:
        self.mkldnn = mkldnn
    return flows.float(), style.float(), [d.float() for d in downs]


def resumed_train_seg(net, *args, n_epochs, save_path, model_name, **kwargs):
    weights = os.path.join(save_path, "models", model_name)
    net.load_model(weights, device=torch.device("cpu"))
    print(f"resuming from {weights} after {RESUME} batches: {n_epochs - RESUME} to go", flush=True)
    kwargs.update(save_path=save_path, model_name=model_name)
    return train_seg(net, *args, n_epochs=n_epochs - RESUME, **kwargs)


if __name__ == "__main__":
    if not os.path.isfile(SCRIPT):
        sys.exit(f"no peer script at {SCRIPT}: set PEER_SCRIPT=/path/to/ref_cellpose.py")
    resnet_torch.CPnet.forward = forward
    if RESUME:
        train.train_seg = resumed_train_seg
    if AUGMENT:
        models.CellposeModel.eval = augmented_eval
    sys.argv = [SCRIPT] + sys.argv[1:]
    runpy.run_path(SCRIPT, run_name="__main__")

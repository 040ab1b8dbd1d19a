"""diffusers' unconditional image training loop, with isofast's Iso-Diffusion loss dropped in.

The loop is the one of diffusers' ``examples/unconditional_image_generation/train_unconditional.py``:
accelerate's `Accelerator`, a `UNet2DModel`, a `DDPMScheduler`, AdamW, an lr schedule from
``diffusers.optimization``, optional EMA (`EMAModel`), a folder of images; here with a local model config
(nothing downloaded) and a step budget. Against that loop four lines are added or replaced, each marked
``# isofast:``, and one is removed (3.):

1. ``from isofast import NoiseSchedule, iso_ddpm_loss, q_sample`` (added);
2. ``sched = NoiseSchedule.from_diffusers(noise_scheduler)``: the scheduler's schedule (added);
3. ``noise = torch.randn(clean_images.shape, ...)`` removed: ``q_sample`` draws the noise as a `NoiseKey`
   (on a GPU 16 bytes, whose values the loss regenerates; on a CPU the key carries its draw);
4. ``noisy_images, noise = q_sample(clean_images, timesteps, sched)`` (was ``noise_scheduler.add_noise``);
5. ``loss = iso_ddpm_loss(noise_pred, noise, iso_lambda=args.iso_lambda)`` (was ``F.mse_loss(noise_pred,
   noise)``; with ``--iso-lambda 0`` it is that MSE).

    accelerate launch examples/diffusers_unconditional.py --train-data-dir ~/images --model-config unet.json \\
        --resolution 32 --train-batch-size 16 --max-train-steps 10000 --iso-lambda 0.3 --use-ema \\
        --output-dir runs/unet-iso --save-pipeline

(``python examples/diffusers_unconditional.py ...`` runs it in one process.) The model config is a
UNet2DModel ``config.json``; its ``in_channels`` (1 or 3) decides grayscale or RGB, its ``sample_size`` (when
set) must be ``--resolution``; without ``--model-config`` the model is diffusers' example architecture at that size.
Writes ``OUTPUT_DIR/losses.csv`` (step, loss, lr) and, with ``--save-pipeline``, a `DDPMPipeline`
(``save_pretrained``: the EMA weights with ``--use-ema``) that ``DDPMPipeline.from_pretrained`` loads.
Needs ``pip install "isofast[diffusers]"`` (diffusers and accelerate).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm.auto import tqdm

from isofast import NoiseSchedule, iso_ddpm_loss, q_sample  # isofast: the noising and the loss

# diffusers' example architecture, used when no --model-config is given (sample_size is --resolution)
DEFAULT_UNET = {
    "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
}
COLOR_MODES = {1: "L", 3: "RGB"}  # in_channels -> the PIL mode the images are read in


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-data-dir", required=True, help="a folder of images (searched recursively)")
    p.add_argument("--model-config", default=None, help="a local UNet2DModel config JSON (default: diffusers' "
                   "example architecture at --resolution)")
    p.add_argument("--resolution", type=int, default=64, help="images are resized and center-cropped to this")
    p.add_argument("--train-batch-size", type=int, default=16, help="batch per process")
    p.add_argument("--max-train-steps", type=int, default=10_000, help="optimizer steps in all")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--lr-scheduler", default="cosine", help="a diffusers.optimization schedule name")
    p.add_argument("--lr-warmup-steps", type=int, default=500)
    p.add_argument("--adam-beta1", type=float, default=0.95)
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--adam-weight-decay", type=float, default=1e-6)
    p.add_argument("--adam-epsilon", type=float, default=1e-8)
    p.add_argument("--use-ema", action="store_true", help="keep an EMA of the weights; the saved pipeline uses it")
    p.add_argument("--ema-inv-gamma", type=float, default=1.0)
    p.add_argument("--ema-power", type=float, default=3 / 4)
    p.add_argument("--ema-max-decay", type=float, default=0.9999)
    p.add_argument("--ddpm-num-steps", type=int, default=1000, help="the DDPMScheduler's num_train_timesteps")
    p.add_argument("--ddpm-beta-schedule", default="linear", help="the DDPMScheduler's beta_schedule")
    p.add_argument("--iso-lambda", type=float, default=0.3, help="weight of the isotropy penalty (0: plain MSE)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--dataloader-num-workers", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="steps per losses.csv row and printed line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="ddpm-iso-model", help="losses.csv and the saved pipeline")
    p.add_argument("--save-pipeline", action="store_true", help="save a DDPMPipeline into --output-dir at the end")
    args = p.parse_args(argv)
    for name in ("resolution", "train_batch_size", "max_train_steps", "gradient_accumulation_steps", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.iso_lambda < 0:
        p.error(f"--iso-lambda must be >= 0, got {args.iso_lambda}")
    return args


class ImageFiles(torch.utils.data.Dataset):
    """Every image file under ``root`` (a flat folder, or torchvision's ImageFolder layout; labels are not
    used), as {"input": transformed image}: the batches diffusers' example reads from its "imagefolder"."""

    def __init__(self, root: str, transform, mode: str) -> None:
        self.paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not self.paths:
            raise SystemExit(f"--train-data-dir {root}: no image files ({', '.join(IMG_EXTENSIONS)})")
        self.transform, self.mode = transform, mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        with Image.open(self.paths[index]) as image:
            return {"input": self.transform(image.convert(self.mode))}


def build_unet(args: argparse.Namespace) -> UNet2DModel:
    if args.model_config is None:
        return UNet2DModel(sample_size=args.resolution, **DEFAULT_UNET)
    config = json.loads(Path(args.model_config).read_text())
    size = config.setdefault("sample_size", args.resolution)
    if size != args.resolution:
        raise SystemExit(f"--model-config {args.model_config}: sample_size {size} differs from --resolution "
                         f"{args.resolution}")
    if config.get("in_channels", 3) not in COLOR_MODES:
        raise SystemExit(f"--model-config {args.model_config}: in_channels must be 1 or 3, got {config['in_channels']}")
    return UNet2DModel.from_config(config)


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision)
    torch.manual_seed(args.seed)
    model = build_unet(args)
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule)
    sched = NoiseSchedule.from_diffusers(noise_scheduler)  # isofast: the scheduler's schedule, for q_sample
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    augmentations = transforms.Compose([
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    dataset = ImageFiles(args.train_data_dir, augmentations, COLOR_MODES[model.config.in_channels])
    train_dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                                                   num_workers=args.dataloader_num_workers)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True,
                             inv_gamma=args.ema_inv_gamma, power=args.ema_power, model_cls=UNet2DModel,
                             model_config=model.config)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler)
    if ema_model is not None:
        ema_model.to(accelerator.device)

    out = Path(args.output_dir)
    log_rows = []
    global_step = 0
    progress = tqdm(total=args.max_train_steps, disable=not accelerator.is_local_main_process)
    for _epoch in range(math.ceil(args.max_train_steps * args.gradient_accumulation_steps / len(train_dataloader))):
        model.train()
        for batch in train_dataloader:
            clean_images = batch["input"]
            bsz = clean_images.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                      device=clean_images.device).long()
            noisy_images, noise = q_sample(clean_images, timesteps, sched)  # isofast: was torch.randn + add_noise

            with accelerator.accumulate(model):
                noise_pred = model(noisy_images, timesteps).sample
                loss = iso_ddpm_loss(noise_pred, noise, iso_lambda=args.iso_lambda)  # isofast: was F.mse_loss(noise_pred, noise)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                if ema_model is not None:
                    ema_model.step(model.parameters())
                progress.update(1)
                global_step += 1
                logs = {"step": global_step, "loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
                progress.set_postfix(**logs)
                if global_step % args.log_every == 0 or global_step == args.max_train_steps:
                    log_rows.append(logs)
                    accelerator.print(f"step {global_step}: loss {logs['loss']:.6f}, lr {logs['lr']:.3g}")
            if global_step >= args.max_train_steps:
                break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "losses.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr"])
            writer.writeheader()
            writer.writerows(log_rows)
        if args.save_pipeline:
            unet = accelerator.unwrap_model(model)
            if ema_model is not None:
                ema_model.copy_to(unet.parameters())
            DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(str(out))
            accelerator.print(f"saved a DDPMPipeline to {out}")
    accelerator.end_training()


if __name__ == "__main__":
    main()

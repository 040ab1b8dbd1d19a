"""A tiny diffusers UNet2DModel (8x8, 1 channel, ~42k parameters) for the diffusers tests: built from a
config, nothing downloaded."""
import torch

TINY_UNET2D = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16], "layers_per_block": 1,
    "norm_num_groups": 4, "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"], "attention_head_dim": None,
}


def tiny_unet2d(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel.from_config(TINY_UNET2D).eval()

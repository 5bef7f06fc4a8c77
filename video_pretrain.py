"""Pre-train TESTA on video-text (and image-text) pairs with ITC, ITM and LM captioning.

`--sep_img --img_config X.yaml` adds an image loader beside the video loader; each step
takes one batch of each. `pretrained:` in the config continues from a BLIP image
checkpoint or a TESTA checkpoint. A checkpoint is written every epoch.
"""
from configs.keys import ConfigError, value
from configs.load import load_config
from data.loader import create_loader, create_sampler
from data.shards import create_pretrain_dataset
from models import create_model
from runtime.distributed import get_rank, get_world_size
from runtime.errors import UserError, run_cli
from training.cli import build_arg_parser, setup_run
from training.compile import compile_visual_encoder
from training.fit import fit
from training.logging import print_model_summary
from training.objectives import pretrain_losses

# Keys the image config of --sep_img may set; the rest comes from the main config.
IMAGE_CONFIG_KEYS = ("train_file", "batch_size", "num_frm_train", "image_size", "video_root", "max_words",
                     "caption_max_words", "train_shards", "train_shards_samples", "shard_shuffle_buffer")
# Set by the image config's train_file, these main-config keys would otherwise replace it.
SHARD_KEYS = ("train_shards", "train_shards_samples")


def parse_args():
    parser = build_arg_parser(__doc__)
    parser.add_argument("--sep_img", "--sep_image", dest="sep_img", action="store_true",
                        help="train on a separate image loader beside the video loader (needs --img_config)")
    parser.add_argument("--img_config", help="YAML config of the image data for --sep_img")
    args = parser.parse_args()
    if args.sep_img and not args.img_config:
        parser.error("--sep_img needs --img_config")
    return args


def image_data_config(config: dict, path: str) -> dict:
    """The main config with the image loader's own keys from `path` on top."""
    image_config = load_config(path)
    unknown = sorted(set(image_config) - set(IMAGE_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"{path}: keys {unknown} cannot be set for the image loader; "
                          f"allowed: {list(IMAGE_CONFIG_KEYS)}")
    merged = {**config, **image_config}
    if "train_file" in image_config and "train_shards" not in image_config:
        for key in SHARD_KEYS:
            merged.pop(key, None)
    return merged


def main():
    args = parse_args()
    if args.evaluate:  # before set-up: nothing is written
        raise UserError("video_pretrain.py has no evaluation; use the retrieval or QA script with --evaluate")
    run = setup_run(args)
    config = run.config
    data_configs = [config] + ([image_data_config(config, args.img_config)] if args.sep_img else [])
    datasets = [create_pretrain_dataset(name, data_config, get_rank(), get_world_size())
                for name, data_config in zip(("pretrain", "pretrain_image"), data_configs)]
    batch_sizes = [value(data_config, "batch_size", "pre-training") for data_config in data_configs]
    seed, num_workers = value(config, "shuffle_seed"), value(config, "num_workers")
    loaders = [create_loader(dataset, create_sampler(dataset, True, get_world_size(), get_rank(), seed), batch_size,
                             num_workers, train=True, pin_memory=run.device.type == "cuda")
               for dataset, batch_size in zip(datasets, batch_sizes)]
    model = create_model(config, "pretrain", checkpoint=config.get("pretrained") or None).to(run.device)
    print_model_summary(model, model.visual_encoder, config, args.flop_counter)
    if args.compile:
        compile_visual_encoder(model, run.device)

    fit(run, model, tuple(loaders), pretrain_losses(value(config, "alpha"), args.sep_img), "warmup_step_decay",
        bad_input_datasets=datasets, checkpoint_every_epoch=True)


if __name__ == "__main__":
    run_cli(main)

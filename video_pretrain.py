"""Pre-train TESTA on video-text (and image-text) pairs with ITC, ITM and LM captioning.

`--sep_img --img_config X.yaml` adds an image loader beside the video loader; each step
takes one batch of each. `pretrained:` in the config continues from a BLIP image
checkpoint or a TESTA checkpoint. A checkpoint is written every epoch.
"""
import utils
from data import create_dataset, create_loader, create_sampler
from models import build_pretrain_model

# Keys the image config of --sep_img may set; the rest comes from the main config.
IMAGE_CONFIG_KEYS = ("train_file", "batch_size", "num_frm_train", "image_size", "video_root", "max_words")


def parse_args():
    parser = utils.build_arg_parser(__doc__)
    parser.add_argument("--sep_img", "--sep_image", dest="sep_img", action="store_true",
                        help="train on a separate image loader beside the video loader (needs --img_config)")
    parser.add_argument("--img_config", help="YAML config of the image data for --sep_img")
    args = parser.parse_args()
    if args.sep_img and not args.img_config:
        parser.error("--sep_img needs --img_config")
    return args


def main():
    args = parse_args()
    run = utils.setup_run(args)
    config = run.config
    if args.evaluate:
        raise utils.UserError("video_pretrain.py has no evaluation; use the retrieval or QA script with --evaluate")
    utils.require_keys(config, ["train_file", "batch_size", "queue_size", "max_epoch"], "pre-training")
    datasets, batch_sizes = [create_dataset("pretrain", config)], [config["batch_size"]]
    if args.sep_img:
        image_config = utils.load_config(args.img_config)
        unknown = sorted(set(image_config) - set(IMAGE_CONFIG_KEYS))
        if unknown:
            raise utils.ConfigError(f"{args.img_config}: keys {unknown} cannot be set for the image loader; "
                                    f"allowed: {list(IMAGE_CONFIG_KEYS)}")
        image_config = {**config, **image_config}
        datasets.append(create_dataset("pretrain_image", image_config))
        batch_sizes.append(image_config["batch_size"])
    samplers = create_sampler(datasets, [True] * len(datasets), utils.get_world_size(), utils.get_rank(), run.seed)
    loaders = create_loader(datasets, samplers, batch_sizes, [config.get("num_workers", 4)] * len(datasets),
                            [True] * len(datasets), [None] * len(datasets), pin_memory=run.device.type == "cuda")

    model = build_pretrain_model(config, config.get("pretrained") or None).to(run.device)
    utils.print_model_summary(model, model.visual_encoder, config, args.flop_counter)

    def compute_losses(model, batch, context):
        alpha = utils.alpha_ramp(config["alpha"], context.epoch, context.step, context.steps_per_epoch,
                                 ramp_epochs=2)
        if args.sep_img:
            (video, captions), (images, image_captions) = batch
            return model(video.permute(0, 2, 1, 3, 4), captions, alpha,
                         images.permute(0, 2, 1, 3, 4), image_captions)
        video, captions = batch
        return model(video.permute(0, 2, 1, 3, 4), captions, alpha)

    utils.fit(run, model, tuple(loaders), compute_losses, "warmup_step_decay",
              bad_input_datasets=datasets, checkpoint_every_epoch=True)


if __name__ == "__main__":
    utils.run_cli(main)

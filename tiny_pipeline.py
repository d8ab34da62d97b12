"""Build a tiny, randomly initialised FLUX pipeline entirely offline.

The real FLUX.1 checkpoints are tens of GB and live on the model hub, which the test
and CI machines cannot reach. This module fabricates every component of a diffusers
``FluxPipeline`` (both tokenizers included) with the same architecture and configs as
FLUX.1, only much smaller, so the inference code paths can be exercised on a CPU in
seconds. The images it produces are noise-like: only shapes and plumbing are real.

Usage: ``python tiny_pipeline.py DIR`` writes a loadable pipeline directory to DIR.
"""

from __future__ import annotations

import argparse
import io
import json
import os

import sentencepiece as spm
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

# Training text for the T5 sentencepiece model: prompt-like English with enough distinct
# words for a ~512-piece vocab, and every ASCII letter, digit and common punctuation mark,
# so typical prompts tokenize into real pieces instead of <unk>.
CORPUS = """\
A photo of a cat sitting on a red chair in the warm morning light.
The quick brown fox jumps over the lazy dog near the river bank.
An astronaut riding a horse on the surface of the moon, digital art.
A bowl of fresh fruit on a wooden kitchen table, oil painting.
Portrait of an old fisherman with a grey beard, studio lighting, 85mm lens.
A futuristic city at night with neon signs and flying cars in the rain.
Watercolor painting of a small village in the mountains during winter.
A dog wearing sunglasses and a blue hat on a sunny beach.
Close-up of a green leaf covered with drops of water after the storm.
A cozy reading room with tall bookshelves, a fireplace and a sleeping cat.
Two children flying a yellow kite in a field of tall grass and flowers.
A steaming cup of coffee next to a laptop and a notebook, top view.
The Eiffel Tower at sunset, with pink clouds and birds in the sky.
A robot painting a picture of a robot painting a picture, 3D render.
Macro shot of a honey bee collecting pollen from a purple flower.
A lighthouse on a rocky cliff, waves crashing below, dramatic sky.
Minimalist poster with the text "HELLO WORLD" in bold black letters.
A medieval castle surrounded by a dark forest and a misty lake.
Street food market in Tokyo: lanterns, smoke, people and bright colors.
A tiny house made of glass in the middle of a snowy pine forest.
Vintage car parked in front of a diner, 1950s style, film grain.
Underwater scene with coral reef, tropical fish and rays of sunlight.
A white horse running across a green hill under a bright blue sky.
Sketch of a young woman reading a letter by the window, pencil on paper.
High quality, highly detailed, 4k, 8k, sharp focus, cinematic, trending!
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 24 50 100 256 512 1024 2048 2024.
Questions? Answers; colons: dashes - slashes / brackets (round) [square] {curly}.
Quotes 'single' and "double", at @ hash # percent % and & star * plus + equals =.
Golden retriever puppy playing in autumn leaves, shallow depth of field.
Abstract geometric shapes in orange, teal and violet, bauhaus composition.
A samurai standing in a bamboo grove under heavy snowfall, ink wash style.
Spaceship interior with glowing control panels and a view of a distant galaxy.
Freshly baked bread and cheese on a rustic plate beside a bottle of wine.
A giant octopus attacking a pirate ship in a thunderstorm, epic fantasy.
Elegant ballerina dancing on a stage, spotlight, motion blur, long exposure.
Isometric pixel art of a busy harbor with boats, cranes and warehouses.
A polar bear cub sleeping on floating ice under the northern lights.
Cyberpunk hacker typing on a keyboard surrounded by holographic screens.
Hot air balloons drifting over canyons and deserts at dawn, aerial view.
Japanese garden with a koi pond, stone lanterns and cherry blossoms.
An owl perched on a branch, feathers detailed, moonlit background, bokeh.
Children's book illustration of a friendly dragon baking cookies.
Black and white photograph of a busy train station in the nineteen thirties.
Stained glass window depicting a phoenix rising from flames.
Chocolate cake with strawberries and whipped cream, food photography.
Ancient temple ruins overgrown with vines, explorers carrying torches.
A knight in shiny armor kneeling before a queen in a throne room.
Surreal melting clocks draped over tree branches in a desert landscape.
Snowboarder jumping off a ramp, frozen in mid-air, action shot, GoPro.
Tulip fields in the Netherlands with a windmill, vivid spring colors.
Scientist examining glowing crystals in a laboratory full of equipment.
Skyscrapers reflected in a calm harbor, blue hour, long exposure photography.
Handwritten calligraphy on parchment, quill pen, candlelight, cozy desk.
Mountain climbers roped together crossing a glacier beneath jagged peaks.
Retro sci-fi book cover: chrome rocket, ringed planet, bold typography.
A fox curled up asleep inside a hollow log, soft afternoon glow.
Marble statue of a goddess in a museum hall with skylights overhead.
Thunderstorm over wheat fields, lightning bolts, ominous purple clouds.
Farmers' market stall overflowing with pumpkins, squash and apples.
Anime style girl with silver hair holding an umbrella in a neon alley.
Blueprint schematic of a steam locomotive, technical drawing, annotations.
Foggy harbor at dawn with fishing trawlers and seagulls circling masts.
Chameleon clinging to a twig, vibrant scales, extreme macro photography.
Zebra, quartz, jazz, vexing, wizard, juxtaposed, kayak, query, oxygen, xylophone.
"""

# Words that get full-word BPE merges in the CLIP vocab, so CLIP tokenization is not
# purely byte-by-byte (exercising the merge path) while the vocab stays tiny.
CLIP_MERGE_WORDS = (
    "a", "an", "the", "of", "in", "on", "and", "with", "photo", "cat", "dog", "red", "blue",
    "green", "light", "city", "night", "painting", "portrait", "forest", "sky", "art",
)  # fmt: skip

T5_VOCAB_SIZE = 512


def make_t5_tokenizer(workdir: str) -> T5TokenizerFast:
    """Train a tiny sentencepiece unigram model on CORPUS and wrap it as a T5 tokenizer.

    Special ids follow T5: <pad>=0, </s>=1, <unk>=2. ``spiece.model`` is written to
    ``workdir``. Deterministic: same bytes and same tokenizer on every call.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="unigram",
        vocab_size=T5_VOCAB_SIZE,
        # A soft limit: should a sentencepiece version find fewer candidate pieces in the
        # corpus than asked for (about 560 today), train with those instead of failing.
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        # One thread, so that no parallel reduction can reorder sums between runs.
        num_threads=1,
        minloglevel=2,
    )
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    # from_pretrained (not the constructor) is what converts spiece.model into a fast
    # tokenizer on both transformers 4.x and 5.x; in 5.x the constructor ignores vocab_file.
    # extra_ids=0: FLUX never uses T5's sentinel tokens.
    return T5TokenizerFast.from_pretrained(workdir, extra_ids=0)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: maps each byte to a printable unicode character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + i) for i, b in enumerate(others)},
    }


def make_clip_tokenizer(workdir: str) -> CLIPTokenizer:
    """Write a tiny byte-level BPE vocab.json / merges.txt in CLIP's layout and load it.

    Like CLIP's: the 256 byte characters, then the same with the end-of-word suffix
    "</w>", then merged tokens, with <|startoftext|> and <|endoftext|> last (so, as in
    real CLIP, the end token has the highest id and argmax-pooling finds it).
    """
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in CLIP_MERGE_WORDS:
        # Merge left to right, e.g. "cat": (c, a) -> "ca", then (ca, t</w>) -> "cat</w>".
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair, merged = (pieces[0], pieces[1]), pieces[0] + pieces[1]
            if pair not in merges:
                merges.append(pair)
                vocab.append(merged)
            pieces = [merged, *pieces[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]

    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(workdir, "merges.txt"), "w", encoding="utf-8") as f:
        # Both the slow and the fast loader skip this header line, as in CLIP's file.
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    return CLIPTokenizer.from_pretrained(workdir, model_max_length=77, pad_token="<|endoftext|>")


def _randomize_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Re-draw every parameter from ``generator``, with no exact zeros or ones.

    The library defaults are not enough: they depend on the global RNG and on each
    library version's init code, and they leave norm weights at exactly 1 and many
    biases at exactly 0, so an optimised re-implementation that dropped a bias or a norm
    weight would still match the reference. Weight matrices and conv kernels get
    N(0, 1/fan_in), which keeps each layer's output at roughly the scale of its input;
    normalisation weights stay close to 1 and biases close to 0, as in a trained model.
    """
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            with torch.no_grad():
                noise = torch.randn(param.shape, generator=generator)
                if is_norm and name == "weight":
                    param.copy_(1.0 + 0.02 * noise)
                elif param.ndim < 2:
                    param.copy_(0.02 * noise)
                else:
                    fan_in = param[0].numel()
                    param.copy_(noise / fan_in**0.5)


def make_tiny_pipeline(out_dir: str, *, guidance_embeds: bool = True, seed: int = 0) -> str:
    """Save a tiny random-weight FluxPipeline (safetensors) to ``out_dir`` and return it.

    ``guidance_embeds=True`` mimics FLUX.1-dev (guidance-distilled), False mimics
    FLUX.1-schnell. The result is a pure function of ``seed``.
    """
    # Built in the folders that save_pretrained writes them to, so their source files
    # (vocab.json/merges.txt, spiece.model) stay beside them as in the FLUX.1 repos.
    # transformers 4.x needs spiece.model there to reload the T5 tokenizer.
    tokenizer = make_clip_tokenizer(os.path.join(out_dir, "tokenizer"))
    tokenizer_2 = make_t5_tokenizer(os.path.join(out_dir, "tokenizer_2"))

    # Same block structure as FLUX.1: 16 latent channels after 2x2 packing of the 4-channel
    # latents; the rope axes dims sum to attention_head_dim.
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    # Activation, eps and special ids as in FLUX's CLIP ViT-L/14 text tower; the pipeline
    # feeds CLIP's pooled output (hidden_size wide) to the transformer's pooled projection.
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # T5 v1.1 layout (gated GELU, no biases) like FLUX's T5-XXL encoder.
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    # Three resolution levels: vae_scale_factor = 2 ** (3 - 1) = 4, not FLUX's 8, so that
    # height/width must be multiples of 8 (= 4 * the 2x2 packing). Scaling/shift factors
    # are FLUX's own, so the latent (un)normalisation is exercised with real values.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # FLUX.1-dev's scheduler_config.json, with the resolution-dependent shift enabled. Its
    # time shift is "exponential", the default; passing time_shift_type explicitly would
    # break diffusers < 0.33, which lacks the argument.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )

    generator = torch.Generator().manual_seed(seed)
    for model in (transformer, text_encoder, text_encoder_2, vae):
        _randomize_(model, generator)
        model.eval()

    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the pipeline to")
    parser.add_argument("--schnell", action="store_true", help="no guidance embedding, like FLUX.1-schnell")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args()
    make_tiny_pipeline(args.out_dir, guidance_embeds=not args.schnell, seed=args.seed)
    print(f"tiny FLUX pipeline written to {args.out_dir}")


if __name__ == "__main__":
    main()

"""`dualloop predict`: one image through a trained (or converted) model, to look at what it does.

    dualloop predict --checkpoint DIR --image photo.jpg --mask region.png   caption the region, then segment the
                                                                            image from that caption (the dual loop)
    dualloop predict --checkpoint DIR --image photo.jpg --text "the red car" segment the image from a text

Writes into --out (default: predict_out): `prediction.json` (caption, texts, per mask its pixels, SAM2's object
score and, for the cycle, its IoU with the given mask), `<name>.png` masks at the image's size (0/255) and
`overlay.png`; the mask PNGs of an earlier prediction there are removed. Images are read as stored: a 16-bit
grayscale one scaled to 8 bits, an EXIF orientation not applied (the datasets' readers and Sa2VA's evaluation read
the stored pixel grid too; predict says so when the image has one): --mask and every output are on that grid.
A mask is the image's size and foreground where nonzero (palette PNGs by index, as SA-V's; 0/1, 0/255, RGB and
16-bit alike); one with transparency (an editor's cut-out) is its pixels that are not fully transparent. The
model's conventions (prompt style, tiles, SAM2 resize, object gate) are the checkpoint's own, unless given as
model.<name>=value. `eval.answer=generated`: the model generates its reply to each grounding prompt and segments
from its [SEG] (Sa2VA's evaluation; a reply without [SEG] gives an empty mask), instead of the given "It is [SEG].";
each row then has the reply and its number of [SEG]s.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from dualloop.eval.evaluate import check_answer, stacked_captions
from dualloop.eval.metrics import intersection_union, predict_mask, prediction_logits, sample_iou


@torch.no_grad()
def predict(model, image: torch.Tensor, *, mask: torch.Tensor | None = None, texts: list[str] = (),
            max_new_tokens: int = 16, answer: str = "given") -> dict:
    """image uint8 [3, H, W]; mask uint8 [H, W] (caption it, then segment from the caption) and/or texts (segment
    each). Returns {"caption": str | None, "masks": {name: bool [H, W]}, "rows": [per mask: name, text, pixels,
    object_score(, iou)]}; names: "cycle" for the caption's, "text1", "text2", ... for the texts'.
    answer: "given" or "generated" (eval.answer): with "generated" each row also has the model's "reply" to the
    grounding prompt and its "seg_tokens"; a reply without [SEG] gives an empty mask (object_score None)."""
    check_answer(answer)
    if mask is None and not texts:
        raise ValueError("nothing to predict: give a mask to caption and/or texts to segment")
    model.eval()
    size = tuple(image.shape[-2:])
    caption, queries, spans = None, [], []
    tokens = model.vision_tokens([image])  # the tower once (13 tiles of a COCO image with Sa2VA's tiling)
    if mask is not None:
        cap = model.caption([image], [mask], max_new_tokens=max_new_tokens, vision_tokens=tokens)
        caption = cap.texts[0]
        queries.append(("cycle", caption))
        spans.append((cap.ids, cap.lengths))  # grounded from its own ids, as the dual loop and eval do
    if texts:
        queries += [(f"text{i + 1}", t) for i, t in enumerate(texts)]
        spans.append(model.encode_queries(list(texts)))
    ids, lengths = stacked_captions([i for i, _ in spans], [n for _, n in spans], model.pad_token_id)
    images, query_tokens = [image] * len(queries), tokens.expand(len(queries), -1, -1)
    common = dict(caption_ids=ids, caption_lengths=lengths, vision_tokens=query_tokens,
                  queries=[name != "cycle" for name, _ in queries])
    generated = answer == "generated"
    if generated:
        reply = model.ground_reply(images, **common)
        out = model.segment_replies(images, reply)
    else:
        out = model.ground(images, **common)
    masks, rows = {}, []
    for k, ((name, text), lg, score) in enumerate(zip(queries, prediction_logits(model, out),
                                                      _scores(out.object_score, len(queries)))):
        pred = predict_mask(lg, size).cpu()
        masks[name] = pred
        row = {"name": name, "text": text, "pixels": int(pred.sum()), "object_score": score}
        if generated:
            seg = int(out.seg_count[k])
            row.update(reply=reply.texts[k], seg_tokens=seg, object_score=score if seg else None)
        if name == "cycle":
            row["iou_with_mask"] = sample_iou(*intersection_union(pred, mask.cpu() > 0))
        rows.append(row)
    return {"caption": caption, "masks": masks, "rows": rows}


def _scores(object_score: torch.Tensor | None, n: int) -> list:
    return [None] * n if object_score is None else [round(float(s), 4) for s in object_score]


SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # PIL modes of 16-bit grayscale PNG / TIFF
ROTATING = (5, 6, 7, 8)  # EXIF orientations that viewers show with width and height swapped


def read_user_image(path) -> tuple[np.ndarray, int]:
    """An image file → (uint8 [H, W, 3] RGB of the stored pixel grid, its EXIF orientation, 1 when none).
    As the datasets' `read_image`, except that 16-bit grayscale is scaled to 8 bits (PIL's RGB conversion clips
    it at 255: nearly white)."""
    from PIL import Image

    from dualloop.data.masks import read_image

    rgb = read_image(path)  # unreadable files: errors as the datasets name them
    with Image.open(path) as im:
        try:
            orientation = int(im.getexif().get(0x0112, 1))
        except (OSError, ValueError, SyntaxError, TypeError):  # a broken EXIF block: the pixels are still fine
            orientation = 1
        if im.mode in SIXTEEN_BIT:
            gray = (np.asarray(im).astype(np.float32) / 257).round().clip(0, 255).astype(np.uint8)
            rgb = np.repeat(gray[..., None], 3, axis=2)
    return rgb, orientation


def read_user_mask(path) -> np.ndarray:
    """A mask file → uint8 [H, W] in {0, 1}: nonzero pixels (`read_png_mask(threshold=1)`: palette PNGs by index),
    or, for a mask with transparency, its pixels not fully transparent (an editor's cut-out keeps whatever colour
    was under the transparent pixels: white there would be foreground, black inside the object background)."""
    from PIL import Image

    from dualloop.data.masks import read_png_mask

    mask = read_png_mask(path, threshold=1)
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA", "PA"):
            alpha = np.asarray(im.getchannel("A"))
            if (alpha < 255).any():
                mask = (alpha > 0).astype(np.uint8)
    return mask


def _clear_earlier(out: Path) -> None:
    """Remove the mask PNGs of the prediction that `out` holds: a run with fewer masks would leave them beside its
    own. Only the names predict writes (cycle, textN) are touched."""
    try:
        rows = json.loads((out / "prediction.json").read_text()).get("predictions", [])
    except (OSError, ValueError, AttributeError):
        return
    for row in rows:
        name = row.get("name") if isinstance(row, dict) else None
        if isinstance(name, str) and re.fullmatch(r"cycle|text[0-9]+", name):
            (out / f"{name}.png").unlink(missing_ok=True)


def overlay(image: np.ndarray, masks: list[np.ndarray], given: np.ndarray | None) -> np.ndarray:
    """The image with each predicted mask tinted (red, blue, green, ...) and the given mask's outline in yellow."""
    out = image.astype(np.float32)
    colours = [(255, 40, 40), (40, 90, 255), (40, 200, 60), (230, 40, 230), (40, 220, 220)]
    for i, m in enumerate(masks):
        out[m] = 0.55 * out[m] + 0.45 * np.array(colours[i % len(colours)], np.float32)
    if given is not None:
        g = given.astype(bool)
        edge = g & ~(np.roll(g, 1, 0) & np.roll(g, -1, 0) & np.roll(g, 1, 1) & np.roll(g, -1, 1))
        out[edge] = (255, 230, 0)
    return out.clip(0, 255).astype(np.uint8)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dualloop predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a training output dir or checkpoint, an export, or a convert-sa2va directory")
    p.add_argument("--config", default=None, help="training YAML, only for a checkpoint without its config.yaml")
    p.add_argument("--image", required=True, help="an image file (JPEG, PNG, ...)")
    p.add_argument("--mask", default=None, help="a mask PNG of the image's size (nonzero: the region to caption)")
    p.add_argument("--text", action="append", default=[], help="a text to segment (repeatable)")
    p.add_argument("--out", default="predict_out", help="output directory (default: predict_out)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--max-new-tokens", type=int, default=16, help="caption length limit (default 16)")
    p.add_argument("overrides", nargs="*", help="model conventions instead of the checkpoint's: model.max_tiles=1, "
                   "model.prompt_style=..., model.sam2_resize=..., model.object_gate=...; eval.answer=generated: "
                   "segment from the model's own reply to the grounding prompt (default given: 'It is [SEG].')")
    return p


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from dualloop.config import MODEL_CONVENTIONS, load_config
    from dualloop.data.masks import BadSample
    from dualloop.eval.evaluate import _eval_device, given_conventions, load_checkpoint_model

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    try:
        if args.mask is None and not args.text:
            raise ValueError("give --mask (a region to caption) and/or --text (something to segment)")
        for text in args.text:
            if not text.strip():  # "Please segment ." would still give a mask, of nothing asked for
                raise ValueError(f"--text {text!r} is empty: give something to segment")
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        device = _eval_device(args.device)
        image, orientation = read_user_image(args.image)
        turned = (f"; --image has EXIF orientation {orientation}: viewers show it turned, predict reads its stored "
                  f"pixel grid ({image.shape[1]}x{image.shape[0]})") if orientation in ROTATING else ""
        given = None
        if args.mask is not None:
            given = read_user_mask(args.mask)
            if given.shape != image.shape[:2]:
                raise ValueError(f"--mask {args.mask} is {given.shape[1]}x{given.shape[0]} but --image {args.image} "
                                 f"is {image.shape[1]}x{image.shape[0]}: a mask must have its image's size{turned}")
            if not given.any():
                raise ValueError(f"--mask {args.mask} is empty: no region to caption")
        try:  # before the model loads: a file in the way is found at once
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {args.out}: cannot be a directory ({e.strerror or e})") from e
        cfg = load_config(args.config, args.overrides)
        conventions = given_conventions(cfg, args.overrides)
        named = {o.split("=", 1)[0].strip() for o in args.overrides}
        if {f"model.{k}" for k in conventions} != named - {"eval.answer"}:
            raise ValueError(f"predict takes model conventions only as key=value ({', '.join(MODEL_CONVENTIONS)}; "
                             f"and eval.answer), got {' '.join(args.overrides)}")
        answer = check_answer(cfg.eval.answer)
        model = load_checkpoint_model(args.checkpoint, cfg if args.config else None).to(device)
        if conventions:  # the command line wins over what the checkpoint recorded (they change no weight)
            model.use_conventions(**conventions)
    except (ValueError, BadSample, OSError) as e:  # ConfigError is a ValueError
        print(f"dualloop predict: {e}", file=sys.stderr)
        return 2
    if orientation != 1:
        print(f"dualloop predict: --image {args.image} has EXIF orientation {orientation}, not applied: the masks "
              "and overlay.png are on its stored pixel grid (as the datasets and Sa2VA's evaluation read images)",
              file=sys.stderr)
    img = torch.from_numpy(np.ascontiguousarray(image).copy()).permute(2, 0, 1).contiguous()
    msk = None if given is None else torch.from_numpy(given)
    result = predict(model, img.to(device), mask=None if msk is None else msk.to(device), texts=args.text,
                     max_new_tokens=args.max_new_tokens, answer=answer)
    _clear_earlier(out)
    for name, m in result["masks"].items():
        Image.fromarray(m.numpy().astype(np.uint8) * 255).save(out / f"{name}.png")
    Image.fromarray(overlay(image, [m.numpy() for m in result["masks"].values()], given)).save(out / "overlay.png")
    record = {"checkpoint": args.checkpoint, "image": args.image, "exif_orientation": orientation, "mask": args.mask,
              "answer": answer, "caption": result["caption"], "predictions": result["rows"]}
    (out / "prediction.json").write_text(json.dumps(record, indent=1))
    if result["caption"] is not None:
        print(f"caption: {result['caption']}")
    for row in result["rows"]:
        extra = f", IoU with --mask {row['iou_with_mask']:.3f}" if "iou_with_mask" in row else ""
        said = ""
        if "reply" in row:  # eval.answer=generated
            said = f" -> reply {row['reply']!r}" + ("" if row["seg_tokens"] else " (no [SEG]: empty mask)")
        print(f"{row['name']}: {row['text']!r}{said} -> {row['pixels']} pixels{extra} "
              f"({out / (row['name'] + '.png')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One-process DeepSpeed ZeRO-3 run of the tiny model (CPU, gloo): build partitioned, caption, ground, step, save.

Run by tests/test_model_zero3.py in a subprocess so DeepSpeed's global state does not leak into other tests.
Prints one JSON line of results. Usage: python zero3_model_worker.py OUT_DIR [fp32|bf16] [VLM_DIR SAM2_DIR]
(with the two checkpoint directories the `pretrained` preset is built: from_pretrained under zero.Init + resize).
"""
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29613")
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import deepspeed  # noqa: E402
import torch  # noqa: E402

from dualloop.config import LoraConfig, ModelConfig  # noqa: E402
from dualloop.model import build_model, load_model  # noqa: E402


def main(out_dir: str, precision: str, vlm_dir: str | None = None, sam2_dir: str | None = None) -> dict:
    deepspeed.init_distributed("gloo")
    torch.manual_seed(0)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            # 0: every parameter is released after use, so a weight read outside its module's forward fails here
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 0,
        },
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,
    }
    cfg = ModelConfig(preset="tiny", lora=LoraConfig(r=8, alpha=16, dropout=0.0))
    if vlm_dir is not None:
        cfg = ModelConfig(preset="pretrained", vlm_path=vlm_dir, sam2_path=sam2_dir, lora=cfg.lora)
    model = build_model(cfg, ds_config=ds_config)
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    empty_outside_forward = all(p.data.numel() == 0 for p in model.parameters())
    loaded_ok = None
    if vlm_dir is not None:  # the partitioned weights hold the checkpoint's values
        from transformers import InternVLForConditionalGeneration, Sam2Model

        from dualloop.model.build import _no_global_zero3

        with _no_global_zero3():
            ref_sam2 = Sam2Model.from_pretrained(sam2_dir)
            ref_vlm = InternVLForConditionalGeneration.from_pretrained(vlm_dir)
        pairs = [(model.sam2.mask_decoder.iou_token.weight, ref_sam2.mask_decoder.iou_token.weight),
                 (model.sam2.vision_encoder.neck.convs[0].weight, ref_sam2.vision_encoder.neck.convs[0].weight),
                 (model.vlm.model.language_model.layers[0].mlp.up_proj.base_layer.weight,
                  ref_vlm.model.language_model.layers[0].mlp.up_proj.weight)]
        with deepspeed.zero.GatheredParameters([a for a, _ in pairs]):
            loaded_ok = all(torch.equal(a.detach(), b.detach()) for a, b in pairs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 72, 64), generator=g, dtype=torch.uint8) for _ in range(2)]
    masks = [torch.zeros(72, 64, dtype=torch.uint8) for _ in range(2)]
    masks[0][10:40, 5:30] = 1
    masks[1][3, 3] = 1
    cap = model.caption(images, masks, max_new_tokens=4, synced_gpus=True)
    ids, lengths = model.encode_captions(["the red circle", "blue square on the left"])
    before = {}
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for name, p in model.named_parameters():
            before[name] = p.detach().float().clone()
    losses = []
    for _ in range(2):
        out = engine.module.ground(images, caption_ids=ids, caption_lengths=lengths)
        soft = model.embed_tokens(ids)  # soft-token path too
        out2 = engine.module.ground(images, caption_embeds=soft, caption_lengths=lengths)
        cap_loss = engine.module.caption_loss(images, masks, ["the red circle", "a blue square"]).mean()
        loss = out.logits.float().sigmoid().mean() + out2.logits.float().sigmoid().mean() + cap_loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    changed, frozen_changed = set(), []
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for name, p in model.named_parameters():
            moved = not torch.equal(before[name], p.detach().float())
            if moved and p.requires_grad:
                changed.add(name.split(".")[0] + ":" + _component(name))
            if moved and not p.requires_grad:
                frozen_changed.append(name)
    model.save_pretrained(out_dir)
    reloaded = load_model(out_dir)
    engine.eval()
    reloaded.eval()
    with torch.no_grad():
        a = engine.module.ground(images, caption_ids=ids, caption_lengths=lengths).logits.float()
        b = reloaded.ground(images, caption_ids=ids, caption_lengths=lengths).logits.float()
    return {
        "partitioned": partitioned,
        "loaded_ok": loaded_ok,
        "empty_outside_forward": empty_outside_forward,
        "caption_lengths": cap.lengths.tolist(),
        "logits_shape": list(out.logits.shape),
        "losses": losses,
        "changed": sorted(changed),
        "frozen_changed": frozen_changed,
        "reloaded_params": sum(p.numel() for p in reloaded.parameters()),
        "params": sum(p.ds_numel for p in model.parameters()),
        "reload_max_diff": (a - b).abs().max().item(),
        "dtype": str(next(model.parameters()).dtype),
    }


def _component(name: str) -> str:
    from dualloop.model.trainable import component_of

    return component_of(name)


if __name__ == "__main__":
    from dualloop.distributed import exit_after_leaving, leave_together

    result = main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "fp32", *sys.argv[3:5])
    print("RESULT " + json.dumps(result), flush=True)
    leave_together()
    exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")

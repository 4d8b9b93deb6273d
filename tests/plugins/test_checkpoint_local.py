"""Local checkpoints: complete-or-nothing step directories, keep-last-N, leftovers cleaned."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.plugins.checkpoint_local import LocalCheckpoints


def test_save_latest_prune_and_stale_temporaries(tmp_path, tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    store = LocalCheckpoints(tmp_path / "ckpt", tmp_path / "final", keep_last=2)
    assert store.latest() is None
    for step in (1, 2, 3):
        store.save(step, model=model, tokenizer=tokenizer,
                   trainer_state={"x": torch.tensor([step])}, loop_state={"step": step})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000002", "step-00000003"]

    # a run killed mid-write leaves a temporary directory: never taken as a checkpoint, removed later
    (tmp_path / "ckpt" / ".tmp-step-00000004-999").mkdir()
    latest = store.latest()
    assert latest.step == 3 and latest.loop_state == {"step": 3}
    assert latest.trainer_state["x"].tolist() == [3]
    assert AutoModelForCausalLM.from_pretrained(latest.model_dir).config.vocab_size == model.config.vocab_size
    store.save(4, model=model, tokenizer=tokenizer, trainer_state={}, loop_state={"step": 4})
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))

    uri = store.save_final(model=model, tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(uri).get_vocab() == tokenizer.get_vocab()

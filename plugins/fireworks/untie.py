"""Copy a tied-embedding model as an untied one, for a vLLM server the sampler syncs weights into.

    python -m distill.plugins.fireworks.untie STUDENT_DIR OUT_DIR

vLLM (0.32) reloads weights in place without re-tying a tied ``lm_head``, so after a sync it would
keep scoring with the old head. Started from this copy, whose config says the embeddings are untied
and whose weights hold ``lm_head.weight``, it loads the head as a weight of its own; the sampler
writes that tensor on every sync. The copy computes exactly what the original does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["untie", "main"]


def untie(source: str | Path, target: str | Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return Path(target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.plugins.fireworks.untie", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="model folder with tied embeddings")
    parser.add_argument("target", help="folder to write the untied copy to")
    args = parser.parse_args(argv)
    print(untie(args.source, args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())

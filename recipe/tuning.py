"""Which parameters a fine-tune trains: LoRA, bias-only, block freezing (README Eq. 16).

References
- Ziarko, Jiang, Miłoś et al. "Repurposing Language Models into Embedding Models: Finding the
  Compute-Optimal Recipe", arXiv 2406.04165 (2024): full fine-tuning, LoRA, bias-only and block
  freezing compared at equal training FLOPs (Eq. 15, in recipe/flops.py).
- Hu et al. "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (Eq. 16).

Kept apart from starbucks.py, which holds pure functions of tensors: these functions change a model
in place (freeze parameters, swap nn.Linear modules for LoRA-wrapped ones and back).

Methods, as `finetune.py --tuning` names them: 'full', 'lora', 'bias', 'freeze:K' (all but the last
K transformer blocks frozen).
"""
import copy
import math

import torch

import starbucks as sb

# LoRA on every nn.Linear inside the transformer blocks: attention and MLP projections, as Ziarko et
# al.
ALL_LINEAR = "all-linear"


# ----------------------------------------------------------------------------------------------
# LoRA (Eq. 16)

class LoRALinear(torch.nn.Module):
    """Eq. 16: h = W_0 x + b + (alpha / r) B A x, with W_0 and b frozen, A (r, in) and B (out, r)
    trained.

    B starts at zero, so the wrapped layer first computes exactly what the base layer did.
    """

    def __init__(self, base, r, alpha):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {r}")
        self.base = base
        self.base.requires_grad_(False)
        self.scaling = alpha / r
        self.lora_A = torch.nn.Parameter(base.weight.new_empty(r, base.in_features))
        self.lora_B = torch.nn.Parameter(base.weight.new_zeros(base.out_features, r))
        # as nn.Linear (and the LoRA paper's code)
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling  # (..., out)

    def merged(self):
        """Eq. 16 folded into one nn.Linear: W = W_0 + (alpha / r) B A (same outputs, no
        adapter)."""
        linear = copy.deepcopy(self.base)
        with torch.no_grad():
            linear.weight += (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        linear.requires_grad_(True)
        return linear


def _replace(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_lora(model, r, alpha, target_modules=ALL_LINEAR):
    """Freeze the model and wrap the target nn.Linear layers of its transformer blocks -> wrapped
    names.

    target_modules: 'all-linear', or module names such as ['q_proj', 'v_proj'] (matched against the
    last part of each Linear's name inside the blocks).
    """
    model.requires_grad_(False)
    blocks = sb.transformer_layers(model)
    in_blocks = {id(m) for m in blocks.modules()}
    targets = None if target_modules == ALL_LINEAR else set(target_modules)
    names = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and id(m) in in_blocks
             and (targets is None or name.rpartition(".")[2] in targets)]
    if not names:
        found = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and id(m) in in_blocks})
        raise ValueError(f"no Linear layer in the transformer blocks is named {sorted(targets)}; "
                         f"this model's are {found}")
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), r, alpha))
    return names


def merge_lora(model):
    """Replace every LoRALinear by its merged nn.Linear, in place -> the model (loads with AutoModel
    once saved)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _replace(model, name, m.merged())
    return model


def merged_copy(model):
    """The model as it should be saved: a merged copy when it carries LoRA, else the model
    itself."""
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        return model
    return merge_lora(copy.deepcopy(model))


# ----------------------------------------------------------------------------------------------
# Bias-only and block freezing

def train_biases_only(model):
    """Freeze every parameter but the biases -> their names (BitFit; Llama-style models have
    none)."""
    names = [n for n, p in model.named_parameters() if n.rpartition(".")[2] == "bias"]
    if not names:
        raise ValueError(f"{type(model).__name__} has no bias parameters: bias-only tuning would "
                         "train nothing (Llama-style models have none); use --tuning lora or "
                         "freeze:K")
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return names


def train_last_blocks(model, k):
    """Freeze everything but the last k transformer blocks and the final norm above them -> trained
    names."""
    blocks = sb.transformer_layers(model)
    if not 1 <= k <= len(blocks):
        raise ValueError(f"freeze:{k}: k must be in 1..{len(blocks)} (the model has {len(blocks)} "
                         "blocks)")
    norm = sb.final_norm(model)
    keep = {id(p) for block in blocks[len(blocks) - k:] for p in block.parameters()}
    keep |= {id(p) for p in norm.parameters()} if norm is not None else set()
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# Choosing a method, and its training FLOPs (Eq. 15)

def parse_tuning(text):
    """'full' | 'lora' | 'bias' | 'freeze:K' -> (method, k); k is None except for freeze."""
    method, _, k = text.partition(":")
    if method in ("full", "lora", "bias") and not k:
        return method, None
    if method == "freeze" and k.isdigit() and int(k) >= 1:
        return method, int(k)
    raise ValueError(f"cannot read --tuning {text!r}: use full, lora, bias or freeze:K (K >= 1 "
                     "blocks trained)")


def apply_tuning(model, tuning, lora_r=32, lora_alpha=32, lora_target_modules=ALL_LINEAR):
    """Set which parameters train (and add LoRA adapters) for a --tuning value -> the model."""
    method, k = parse_tuning(tuning)
    if method == "lora":
        add_lora(model, lora_r, lora_alpha, lora_target_modules)
    elif method == "bias":
        train_biases_only(model)
    elif method == "freeze":
        train_last_blocks(model, k)
    return model


def parameter_counts(model, parameters=None):
    """(N, N_trainable): N counts the model's own parameters (embeddings included, LoRA adapters
    not); N_trainable counts those with requires_grad (for LoRA: the adapters). parameters: count
    only these (default: all of the model's)."""
    adapters = {id(m.lora_A) for m in model.modules() if isinstance(m, LoRALinear)} | \
               {id(m.lora_B) for m in model.modules() if isinstance(m, LoRALinear)}
    parameters = list(model.parameters()) if parameters is None else parameters
    n = sum(p.numel() for p in parameters if id(p) not in adapters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    return n, trainable

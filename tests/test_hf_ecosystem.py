"""qlib with the Hugging Face ecosystem: peft adapters, transformers models."""
import copy
import warnings

import pytest
import torch
from torch import nn

import qlib
from qlib.nn import Int8Linear, Linear4bit, QATLinear


class LoraLayer(nn.Module):
    """peft's layout of a LoRA layer (base_layer plus lora_A / lora_B ModuleDicts, named by
    `adapter_layer_names`), without peft installed."""
    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base, r=4):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        nn.init.zeros_(self.lora_B["default"].weight)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


LoraLayer.__module__ = "peft.tuners.lora.layer"  # (what qlib recognises peft's classes by)


def lora_net():
    torch.manual_seed(0)
    net = nn.Sequential(LoraLayer(nn.Linear(32, 32)), nn.ReLU(), LoraLayer(nn.Linear(32, 8)))
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    return net


SWAPS = {
    "quantize_dynamic": (qlib.quantize_dynamic, Int8Linear),
    "quantize_weight_only": (qlib.quantize_weight_only, Linear4bit),
    "prepare_qat": (qlib.prepare_qat, QATLinear),
    "prepare": (qlib.prepare, QATLinear),
    "gptq_quantize": (lambda m, **kw: qlib.gptq_quantize(m, [torch.randn(16, 32)], progress=False, **kw), Linear4bit),
}


@pytest.mark.parametrize("swap", list(SWAPS))
def test_swaps_leave_peft_adapters_float(swap):
    # get_peft_model first, then the swap (peft refuses qlib's Int8Linear / Linear4bit as targets):
    # the adapters' Linears became Int8Linear / Linear4bit, frozen, so lora_B stayed zero and the
    # fine-tuning trained nothing, silently.
    fn, kind = SWAPS[swap]
    net = fn(lora_net())
    for layer in (net[0], net[2]):
        assert type(layer.base_layer) is kind
        assert type(layer.lora_A["default"]) is nn.Linear and type(layer.lora_B["default"]) is nn.Linear
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(trainable) == 4
    net.train()
    net(torch.randn(4, 32)).square().sum().backward()
    assert net[2].lora_B["default"].weight.grad.abs().sum() > 0


def test_pattern_naming_only_adapters_warns():
    with pytest.warns(UserWarning, match="matches no nn.Linear.*peft adapters stay float"):
        qlib.quantize_dynamic(lora_net(), filter_fn="*.lora_A.*")


def test_peft_lora_after_the_swap_trains():
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    pm = qlib.quantize_weight_only(pm)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q.base_layer) is Linear4bit and type(q.lora_B["default"]) is nn.Linear
    pm.train()
    pm(ids, labels=ids).loss.backward()
    assert q.lora_B["default"].weight.grad.abs().sum() > 0


def test_linear4bit_weight_error_names_the_way_out():
    # T5's feed-forward reads `wo.weight.dtype` in its forward: after a 4-bit swap it failed with
    # nn.Module's bare "'Linear4bit' object has no attribute 'weight'".
    pytest.importorskip("transformers")
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(0, 64, (2, 5))
    q = qlib.quantize_weight_only(copy.deepcopy(model))
    assert not hasattr(q.encoder.block[0].layer[1].DenseReluDense.wo, "weight")
    with pytest.raises(AttributeError, match="has no `weight`.*leave it out of the 4-bit swap with filter_fn"):
        q(input_ids=ids, decoder_input_ids=ids)
    q = qlib.quantize_weight_only(copy.deepcopy(model), filter_fn=lambda m, name: not name.endswith(".wo"))
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(q(input_ids=ids, decoder_input_ids=ids).logits.flatten(),
                                                    model(input_ids=ids, decoder_input_ids=ids).logits.flatten(), dim=0)
    assert cos > 0.95

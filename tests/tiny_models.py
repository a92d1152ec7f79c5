"""Tiny random-initialised transformers models of each family (no downloads), shared by the method tests."""
import torch

V = 61  # vocabulary


def build(kind: str, *, head: str = "cls", seed: int = 0, num_labels: int = 3):
    """kind: bert | roberta | electra | gpt2 | llama | mistral | qwen2 | qwen3; head: cls (sequence
    classification) | lm | base."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=V, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_labels=num_labels)
    if kind == "bert":
        cfg = tf.BertConfig(hidden_size=32, max_position_embeddings=64, **common)
        classes = (tf.BertForSequenceClassification, tf.BertForMaskedLM, tf.BertModel)
    elif kind == "roberta":
        cfg = tf.RobertaConfig(hidden_size=32, max_position_embeddings=70, pad_token_id=1, **common)
        classes = (tf.RobertaForSequenceClassification, tf.RobertaForMaskedLM, tf.RobertaModel)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_inner=37, n_positions=64, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, num_labels=num_labels)
        classes = (tf.GPT2ForSequenceClassification, tf.GPT2LMHeadModel, tf.GPT2Model)
    elif kind == "electra":  # (token embeddings narrower than the hidden states)
        cfg = tf.ElectraConfig(embedding_size=24, hidden_size=32, max_position_embeddings=64, **common)
        classes = (tf.ElectraForSequenceClassification, tf.ElectraForMaskedLM, tf.ElectraModel)
    elif kind in ("llama", "mistral", "qwen2", "qwen3"):
        cls_cfg = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
                   "qwen3": tf.Qwen3Config}[kind]
        cfg = cls_cfg(hidden_size=32, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, **common)
        name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
        classes = (getattr(tf, f"{name}ForSequenceClassification"), getattr(tf, f"{name}ForCausalLM"), getattr(tf, f"{name}Model"))
    else:
        raise ValueError(kind)
    cls = {"cls": classes[0], "lm": classes[1], "base": classes[2]}[head]
    model = cls(cfg)
    model.eval()
    return model


def batch(seed: int = 1, B: int = 3, T: int = 9, pad_left: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, : 3] = 0 if pad_left else 1
    if pad_left:
        ids[0, :3] = 0
    else:
        mask[0, -3:] = 0
        ids[0, -3:] = 0
    return ids, mask


def logits(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class Logits(torch.nn.Module):
    """``model``'s logits from (input_ids, attention_mask) given by position: the form torch.jit.trace and
    torch.export take."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.distill import choose_layers, drop_layers
from slimkit.train import fit


class Config:
    num_hidden_layers = 6


class Tower(nn.Module):
    """A residual tower: the shape of a transformer encoder, without attention."""

    def __init__(self, depth: int = 6, width: int = 8) -> None:
        super().__init__()
        self.config = Config()
        self.embed = nn.Linear(4, width)
        self.layer = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
        self.heads = nn.ModuleList([nn.Linear(width, 3), nn.Identity()])  # a smaller list, not the blocks

    def forward(self, x):
        h = self.embed(x)
        for block in self.layer:
            h = h + block(h)
        return self.heads[0](h)


def test_drop_layers_keeps_the_chosen_blocks_as_copies():
    t = Tower()
    s = drop_layers(t, keep=None)
    assert len(s.layer) == 3 and len(t.layer) == 6 and s.config.num_hidden_layers == 3
    assert torch.equal(s.layer[0][0].weight, t.layer[1][0].weight) and s.layer[0][0].weight is not t.layer[1][0].weight
    assert torch.equal(s.layer[2][0].weight, t.layer[5][0].weight)  # every other, ending with the last
    x = torch.randn(5, 4)
    assert s(x).shape == t(x).shape
    s2 = drop_layers(t, keep=[0, 2])
    assert torch.equal(s2.layer[1][0].weight, t.layer[2][0].weight)


def test_choose_layers_finds_the_blocks_that_do_nothing():
    t = Tower()
    with torch.no_grad():
        for i in (1, 4):  # these residual branches add zero: dropping them changes nothing
            t.layer[i][0].weight.zero_()
            t.layer[i][0].bias.zero_()
    data = [torch.randn(16, 4) for _ in range(2)]
    assert choose_layers(t, data, 4) == (0, 2, 3, 5)
    big = Tower(depth=12)  # 924 subsets of 6: the greedy path
    with torch.no_grad():
        for i in (0, 3, 7):
            big.layer[i][0].weight.zero_()
            big.layer[i][0].bias.zero_()
    kept = choose_layers(big, [(x, torch.zeros(16, dtype=torch.long)) for x in data], 9)
    assert set(kept) == set(range(12)) - {0, 3, 7}


def test_a_dropped_student_learns_its_teacher_back():
    torch.manual_seed(0)
    t = Tower().eval()
    s = drop_layers(t, keep=choose_layers(t, [torch.randn(64, 4)], 3))
    data = [torch.randn(32, 4) for _ in range(16)]

    def gap():
        with torch.no_grad():
            return sum(float(F.mse_loss(s(x), t(x))) for x in data)

    before = gap()
    fit(s, data, epochs=20, lr=1e-2, optimizer="adamw", weight_decay=0.0, teacher=t, loss=F.mse_loss)
    assert gap() < 0.2 * before


def test_students_bad_input():
    t = Tower()
    with pytest.raises(ValueError, match=r"keep must be increasing"):
        drop_layers(t, keep=[3, 1])
    with pytest.raises(ValueError, match=r"in \[0, 6\)"):
        drop_layers(t, keep=[6])
    with pytest.raises(ValueError, match="not a ModuleList.*'layer'"):
        drop_layers(t, blocks="embed")
    with pytest.raises(ValueError, match="no ModuleList of repeated blocks"):
        drop_layers(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 6\]"):
        choose_layers(t, [torch.randn(2, 4)], 7)
    with pytest.raises(ValueError, match="empty"):
        choose_layers(t, [], 3)


def test_drop_layers_on_a_hugging_face_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=32)
    bert = transformers.BertModel(cfg).eval()
    s = drop_layers(bert)
    assert len(s.encoder.layer) == 2 and s.config.num_hidden_layers == 2 and bert.config.num_hidden_layers == 4
    ids = torch.randint(0, 50, (2, 7))
    assert s(input_ids=ids).last_hidden_state.shape == (2, 7, 16)

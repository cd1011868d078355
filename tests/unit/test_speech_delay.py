"""The delay pattern's exact layout, its inverse, and the talker's targets built from it."""
import pytest
import torch

from omni.speech.delay import delay, eos_id, pad_id, undelay
from omni.speech.talker import IGNORE, collate, targets

SIZE = 10
PAD, EOS = pad_id(SIZE), eos_id(SIZE)


def test_delay_shifts_codebook_k_by_k_and_marks_start_and_end():
    codes = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert delay(codes, SIZE).tolist() == [
        [1, 2, 3, EOS, EOS, EOS],
        [PAD, 4, 5, 6, EOS, EOS],
        [PAD, PAD, 7, 8, 9, EOS],
    ]


@pytest.mark.parametrize("books,frames", [(1, 5), (4, 1), (4, 37), (8, 3), (3, 0)])
def test_undelay_inverts_delay_exactly(books, frames):
    codes = torch.randint(0, SIZE, (books, frames), generator=torch.Generator().manual_seed(books * 100 + frames))
    steps = delay(codes, SIZE)
    assert steps.shape == (books, frames + books)
    for k in range(books):
        assert torch.equal(steps[k, k:k + frames], codes[k])
    assert torch.equal(undelay(steps, SIZE), codes)
    # steps generated past the end (all EOS) decode to the same codes
    assert torch.equal(undelay(torch.cat([steps, torch.full((books, 3), EOS)], dim=1), SIZE), codes)


def test_undelay_refuses_what_the_pattern_cannot_produce():
    steps = delay(torch.tensor([[1, 2, 3], [4, 5, 6]]), SIZE)
    with pytest.raises(ValueError, match="never says EOS"):
        undelay(steps[:, :2], SIZE)
    early = steps.clone()
    early[1, 3] = EOS  # codebook 1 ends a frame before codebook 0
    with pytest.raises(ValueError, match="PAD or EOS lies inside"):
        undelay(early, SIZE)
    late = steps.clone()
    late[1, 4] = 3  # codebook 1 goes on after codebook 0's end
    with pytest.raises(ValueError, match="does not end"):
        undelay(late, SIZE)
    shifted = steps.clone()
    shifted[1, 0] = 4  # a code where the pattern holds PAD
    with pytest.raises(ValueError, match="before its first frame"):
        undelay(shifted, SIZE)
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        delay(torch.tensor([[SIZE]]), SIZE)


def test_batch_targets_align_with_each_answers_delayed_codes():
    width = 6
    a = (torch.randn(2, width), torch.randn(2, width), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]))
    b = (torch.randn(5, width), torch.randn(5, width), torch.tensor([[9], [0]]))
    batch = collate([a, b], SIZE)
    # conditioning is left-padded: both answers' speech starts at the same position
    assert batch.text_mask.tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    assert torch.equal(batch.hidden[0, 3:], a[0]) and torch.equal(batch.text[1], b[1])
    assert batch.steps_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    labels = targets(batch, SIZE)  # [B, S, K]
    assert labels[0].T.tolist() == [[1, 2, 3, 4, EOS, EOS], [IGNORE, 5, 6, 7, 8, EOS]]
    assert labels[1].T.tolist() == [[9, EOS, EOS, IGNORE, IGNORE, IGNORE], [IGNORE, 0, EOS, IGNORE, IGNORE, IGNORE]]

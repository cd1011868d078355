"""The talker: shapes, which step each output position predicts, and a one-utterance overfit that
greedy decoding then speaks back code for code."""
import torch

from omni.speech.delay import delay
from omni.speech.synth import speak
from omni.speech.talker import Talker, TalkerConfig, collate
from omni.speech.tiny_codec import TinyCodec, TinyCodecConfig

THINKER = 24  # the thinker's hidden size
CONFIG = TalkerConfig(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128, codebooks=4,
                      codebook_size=16)


def answer(tokens: int, frames: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, THINKER, generator=g), torch.randn(tokens, THINKER, generator=g),
            torch.randint(0, CONFIG.codebook_size, (CONFIG.codebooks, frames), generator=g))


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    talker = Talker(CONFIG, THINKER)
    batch = collate([answer(3, 7, 0), answer(5, 2, 1)], CONFIG.codebook_size)
    prefix, mask = talker.prefix(batch)
    assert prefix.shape == (2, 5 + 1, CONFIG.hidden_size) and mask.shape == (2, 6)
    logits = talker.logits(prefix, mask)
    assert logits.shape == (2, 6, CONFIG.codebooks, CONFIG.codebook_size + 2)
    loss = talker(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    uniform = torch.log(torch.tensor(CONFIG.codebook_size + 2.0))
    assert abs(loss.item() - uniform.item()) < 0.5  # a fresh head guesses about uniformly
    loss.backward()
    assert talker.from_hidden.weight.grad.abs().sum() > 0 and talker.from_text.weight.grad.abs().sum() > 0


def test_the_output_at_step_j_sees_only_steps_before_j():
    """Position N + j predicts delayed step j: changing step j moves the predictions of steps > j only."""
    torch.manual_seed(0)
    talker = Talker(CONFIG, THINKER).eval()
    batch = collate([answer(4, 6, 2)], CONFIG.codebook_size)
    prefix, mask = talker.prefix(batch)
    steps = batch.steps.shape[2]

    def predictions(steps_in):
        embeds = torch.cat([prefix, talker.embed_steps(steps_in[:, :, :-1])], dim=1)
        full = torch.cat([mask, torch.ones(1, steps - 1, dtype=torch.long)], dim=1)
        return talker.logits(embeds, full)[:, -steps:]

    with torch.no_grad():
        before = predictions(batch.steps)
        changed = batch.steps.clone()
        j = 3
        changed[0, :, j] = (changed[0, :, j] + 1) % CONFIG.codebook_size
        after = predictions(changed)
    assert torch.equal(before[:, :j + 1], after[:, :j + 1])
    assert not torch.allclose(before[:, j + 1], after[:, j + 1])


def test_talker_overfits_one_spoken_answer_and_speaks_it_back():
    wave = speak("orange", 16_000)
    codec = TinyCodec.fit([wave, speak("purple", 16_000), speak("seven", 16_000)],
                          TinyCodecConfig(codebooks=CONFIG.codebooks, codebook_size=CONFIG.codebook_size))
    codes = codec.encode(wave)
    torch.manual_seed(0)
    talker = Talker(CONFIG, THINKER)
    hidden, text, _ = answer(3, 1, 7)
    batch = collate([(hidden, text, codes)], CONFIG.codebook_size)
    assert torch.equal(batch.steps[0], delay(codes, CONFIG.codebook_size))
    opt = torch.optim.AdamW(talker.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = talker(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    talker.eval()
    spoken = talker.generate(batch, max_frames=codes.shape[1] + 4)
    assert len(spoken) == 1 and torch.equal(spoken[0], codes)
    # max_frames cuts a longer answer short into a valid grid; the codes generated before the forced
    # EOS entered the input (frame t of codebook k is step t + k <= 5) are still the learned ones
    short = talker.generate(batch, max_frames=5)[0]
    assert short.shape == (CONFIG.codebooks, 5)
    for k in range(CONFIG.codebooks):
        assert torch.equal(short[k, :6 - k], codes[k, :6 - k][:5])
    # streamed frame by frame (the demo's spoken answers): the same codes, whole and cut short
    for max_frames, want in ((codes.shape[1] + 4, codes), (5, short)):
        assert torch.equal(torch.stack(list(talker.stream(batch, max_frames)), dim=1), want)


def test_cached_generation_is_the_step_by_step_argmax_of_the_whole_sequence():
    """`generate` decodes with a KV cache; each code it takes must be the argmax of the talker run on
    the whole sequence so far without a cache (rows of different lengths, left-padded, included), so
    the cache changes nothing but the cost."""
    torch.manual_seed(0)
    talker = Talker(CONFIG, THINKER).eval()
    batch = collate([answer(2, 1, 3), answer(6, 1, 4)], CONFIG.codebook_size)
    max_frames, size = 6, CONFIG.codebook_size
    for row, codes in enumerate(talker.generate(batch, max_frames=max_frames)):
        n, frames = int(batch.text_mask[row].sum()), codes.shape[1]
        one = collate([(batch.hidden[row, -n:], batch.text[row, -n:], codes)], size)
        prefix, _ = talker.prefix(one)
        steps = one.steps[0]  # [K, frames + K]
        with torch.no_grad():
            embeds = torch.cat([prefix, talker.embed_steps(one.steps[:, :, :-1])], dim=1)
            logits = talker.logits(embeds, torch.ones(1, embeds.shape[1], dtype=torch.long))[0, -steps.shape[1]:]
        for k in range(CONFIG.codebooks):  # every code taken, at steps k .. k + frames - 1
            chosen = logits[k:k + frames, k, :size].argmax(-1)
            assert torch.equal(chosen, steps[k, k:k + frames]), (row, k)
        if frames < max_frames:  # codebook 0 chose to end there
            end = logits[frames, 0].clone()
            end[size] = -torch.inf  # PAD is never chosen
            assert int(end.argmax()) == size + 1, row

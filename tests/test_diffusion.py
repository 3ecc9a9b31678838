"""Diffusion core: schedule, DDIM/DPM-Solver++ updates, the JeDi loss' conditioning, replacement and guidance."""
import math

import pytest
import torch

from model.diffusion import Diffusion, ddim_step, spaced_timesteps, guide, jedi_input, jedi_loss, personalize, sample
from model.unet import UNet, UNetConfig


class Spy(torch.nn.Module):
    """Stands in for the UNet: records every call, predicts a fixed linear function of its input."""

    def __init__(self, out_channels=4):
        super().__init__()
        self.calls, self.c = [], out_channels

    def forward(self, x, t, context, set_size=1):
        self.calls.append(dict(x=x.clone(), t=t.clone(), context=context.clone(), set_size=set_size))
        return 0.1 * x[:, : self.c] + 0.01 * x[:, self.c : 2 * self.c] + context.mean() * 0


def test_sd_schedule_matches_diffusers():
    import diffusers  # the parity oracle: requirements-test.txt, never skipped
    ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(Diffusion().alphas_cumprod.float(), ref, rtol=1e-6, atol=1e-7)


def test_spaced_timesteps_follow_compvis_spacing():
    ts = spaced_timesteps(50)
    assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50 and all(a - b == 20 for a, b in zip(ts, ts[1:]))
    assert spaced_timesteps(1000) == list(range(999, -1, -1))


def test_ddim_eta1_is_the_ddpm_ancestral_step():
    d = Diffusion()
    x_t, eps = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    for t in (999, 500, 10):
        ab, ab_prev = d.alphas_cumprod[t].item(), d.alphas_cumprod[t - 1].item()
        beta = 1 - ab / ab_prev
        x0 = (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        got = ddim_step(d, x_t, t, t - 1, eps, x0, eta=1.0, generator=torch.Generator().manual_seed(t))
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t), dtype=x_t.dtype)
        mean = math.sqrt(ab_prev) * beta / (1 - ab) * x0 + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * x_t
        var = (1 - ab_prev) / (1 - ab) * beta  # DDPM posterior variance β̃_t
        torch.testing.assert_close(got, mean + math.sqrt(var) * z, rtol=1e-10, atol=1e-10)


S_DATA = 0.3  # data x0 ~ N(0, S_DATA²): E[x0 | x_t] is known in closed form and x_T ~ N(0, 1) is nearly exact


def gaussian_denoiser(d: Diffusion):
    def x0_eps(x, t):
        ab = d.alphas_cumprod[t].item()
        x0 = math.sqrt(ab) * S_DATA ** 2 * x / (ab * S_DATA ** 2 + 1 - ab)
        return (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab), x0
    return x0_eps


@pytest.mark.parametrize("sampler,steps", [("ddim", 50), ("dpmpp_2m", 15)])
def test_samplers_match_diffusers_schedulers(sampler, steps):
    import diffusers  # the parity oracle: requirements-test.txt, never skipped
    d = Diffusion()
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if sampler == "ddim":  # SD's settings: 'leading' spacing + offset 1, last step to ᾱ_0
        sched = diffusers.DDIMScheduler(**kw, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
        sched.set_timesteps(steps)
    else:
        sched = diffusers.DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2,
                                                      final_sigmas_type="zero", lower_order_final=True)
        sched.set_timesteps(timesteps=spaced_timesteps(steps))
    assert [int(t) for t in sched.timesteps] == spaced_timesteps(steps)
    fn = gaussian_denoiser(d)
    shape = (4000, 1, 1, 1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in sched.timesteps:
        x = sched.step(fn(x, int(t))[0], t, x).prev_sample
    ours = sample(fn, d, shape, steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(0),
                  dtype=torch.float64)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_samplers_converge_to_the_data_distribution(sampler, prediction):
    d = Diffusion(prediction=prediction)
    fn = gaussian_denoiser(d)

    def model_fn(x, t):  # go through the parameterisation the model would use
        eps, x0 = fn(x, t)
        ab = d.alphas_cumprod[t].item()
        out = eps if prediction == "eps" else math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0
        return d.to_eps_x0(x, torch.tensor([t]), out)

    x = sample(model_fn, d, (20000, 1, 1, 1), steps=250, sampler=sampler, generator=torch.Generator().manual_seed(0),
               dtype=torch.float64)
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - S_DATA) < 0.006, (x.mean(), x.std())


def test_guidance_one_is_the_conditional_prediction():
    c, n = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(guide(c, n, 1.0), c)
    torch.testing.assert_close(guide(c, n, 0.0), n)
    e_ref = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(guide(c, n, 1.0, (e_ref, 1.0)), c)


def personalize_spy(n_refs=2, num_new=2, steps=4, **kw):
    spy = Spy()
    refs = torch.randn(n_refs, 4, 6, 6) if n_refs else None
    ctx = torch.randn(n_refs + num_new, 7, 8)
    null = torch.randn(1, 7, 8)
    out = personalize(spy, Diffusion(), refs=refs, context=ctx, null_context=null, num_new=num_new, steps=steps,
                      generator=torch.Generator().manual_seed(1), latent_shape=(4, 6, 6), **kw)
    return spy, refs, ctx, null, out


def test_replacement_keeps_references_and_renoises_them_each_step():
    spy, refs, ctx, null, out = personalize_spy(num_sets=2)
    N = 4
    assert out.shape == (8, 4, 6, 6)
    torch.testing.assert_close(out.reshape(2, N, 4, 6, 6)[:, :2], refs.expand(2, -1, -1, -1, -1), rtol=0, atol=0)
    d = Diffusion()
    prev_noise = None
    for call in spy.calls:
        x = call["x"][:8]  # the conditional pass
        t = call["t"][0].item()
        ab = d.alphas_cumprod[t].item()
        known_xt = x[:, :4].reshape(2, N, 4, 6, 6)[:, :2]
        noise = (known_xt - math.sqrt(ab) * refs) / math.sqrt(1 - ab)  # must be a standard normal draw
        assert 0.7 < noise.std().item() < 1.3
        if prev_noise is not None:
            assert not torch.allclose(noise, prev_noise)  # fresh noise every step
        prev_noise = noise


def test_null_pass_zeroes_references_keeps_mask_and_blanks_text():
    spy, refs, ctx, null, _ = personalize_spy()
    x = spy.calls[0]["x"]
    cond, uncond = x.chunk(2)
    assert spy.calls[0]["set_size"] == 4
    torch.testing.assert_close(cond[:2, 4:8], refs)  # reference channels
    assert torch.count_nonzero(cond[2:, 4:8]) == 0 and torch.count_nonzero(uncond[:, 4:8]) == 0
    torch.testing.assert_close(cond[:, 8], uncond[:, 8])  # the mask is kept in ε⁰
    assert cond[:2, 8].eq(1).all() and cond[2:, 8].eq(0).all()
    c_cond, c_null = spy.calls[0]["context"].chunk(2)
    torch.testing.assert_close(c_cond, ctx)
    torch.testing.assert_close(c_null, null.expand_as(ctx))


def test_without_references_and_empty_text_the_conditional_pass_is_eps0():
    spy = Spy()
    null = torch.randn(1, 7, 8)
    personalize(spy, Diffusion(), refs=None, context=null.expand(3, -1, -1), null_context=null, num_new=3, steps=2,
                latent_shape=(4, 6, 6), generator=torch.Generator().manual_seed(0))
    cond, uncond = spy.calls[0]["x"].chunk(2)
    torch.testing.assert_close(cond, uncond, rtol=0, atol=0)


def tiny_unet(seed=0):
    """A random UNet whose output depends on text and references alike: PyTorch's default init, and the
    zero-initialised layers (zero_module) given weights, or ε(x̂, "") and ε(x̂, text) would differ by ~1e-6."""
    torch.manual_seed(seed)
    unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1,
                           num_heads=2, context_dim=8)).eval()
    for p in unet.parameters():
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, 0, 0.05)
    return unet


@pytest.mark.parametrize("text_guidance", [None, 4.0])
def test_a_guided_step_combines_separately_run_passes(text_guidance):
    """Oracle: each guidance pass run as its own UNet call on the x_t personalize fed the UNet, combined by hand
    (eq. 3, or the three-pass form ε⁰ + λ(ε(x̂, "") − ε⁰) + s_T(ε(x̂, text) − ε(x̂, ""))), then one DDIM step by
    hand; the new images' next x_t must be what personalize fed the UNet at the second step."""
    unet, d = tiny_unet(), Diffusion()
    S, n, N, lam = 2, 1, 3, 2.5  # 2 sets of [1 reference, 2 new]
    refs, ctx, null = torch.randn(n, 4, 8, 8), torch.randn(N, 7, 8), torch.randn(1, 7, 8)
    seen = []  # x_t (the first 4 input channels) of each UNet call; every pass of a call sees the same one

    def recording(x, t, context, set_size=1):
        seen.append(x[: S * N, :4].clone())
        return unet(x, t, context, set_size=set_size)

    with torch.no_grad():
        personalize(recording, d, refs=refs, context=ctx, null_context=null, num_new=N - n, num_sets=S, steps=2,
                    guidance=lam, text_guidance=text_guidance, generator=torch.Generator().manual_seed(0))
        t, t_next = spaced_timesteps(2)
        x_t = seen[0]
        given = torch.tensor([1.0, 0.0, 0.0]).repeat(S)  # (S·N,) mask
        m = given.reshape(-1, 1, 1, 1).expand(-1, 1, 8, 8)  # (S·N, 1, h, w) mask channel
        ref = torch.cat([refs, torch.zeros(N - n, 4, 8, 8)]).repeat(S, 1, 1, 1)  # (S·N, 4, h, w) x̂ ⊙ M
        text, empty = ctx.repeat(S, 1, 1), null.expand(S * N, -1, -1)

        def eps(reference, context):  # one pass alone
            return unet(torch.cat([x_t, reference, m], 1), torch.full((S * N,), t), context, set_size=N)

        e_cond, e_0 = eps(ref, text), eps(torch.zeros_like(ref), empty)
        if text_guidance is None:
            e = e_0 + lam * (e_cond - e_0)
        else:
            e_ref = eps(ref, empty)
            e = e_0 + lam * (e_ref - e_0) + text_guidance * (e_cond - e_ref)
        ab, ab_next = d.alphas_cumprod[t].item(), d.alphas_cumprod[t_next].item()
        x0 = (x_t - math.sqrt(1 - ab) * e) / math.sqrt(ab)
        want = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next) * e  # DDIM, η = 0
    new = given == 0  # the references' next x_t is a fresh noising, not a step
    assert len(seen) == 2 and seen[0].shape[0] == S * N
    torch.testing.assert_close(seen[1][new], want[new], rtol=1e-5, atol=1e-5)
    assert (e_cond - e_0).abs().mean() > 0.1 and (e_cond - eps(ref, empty)).abs().mean() > 0.01  # passes differ


def test_without_references_text_guidance_is_plain_text_guidance():
    """No references: ε(x̂, "") is ε⁰ itself, so text_guidance s with any λ samples as guidance s alone; a third pass
    that kept the text, or swapped scales, would sample as λ."""
    unet, null = tiny_unet(), torch.randn(1, 7, 8)
    args = dict(refs=None, context=torch.randn(2, 7, 8), null_context=null, num_new=2, steps=3, latent_shape=(4, 8, 8))

    @torch.no_grad()
    def run(**kw):
        return personalize(unet, Diffusion(), generator=torch.Generator().manual_seed(0), **args, **kw)

    three_pass = run(guidance=7.0, text_guidance=3.0)
    torch.testing.assert_close(three_pass, run(guidance=3.0), rtol=1e-5, atol=1e-5)
    assert (three_pass - run(guidance=7.0)).abs().mean() > 0.05


def test_bf16_unet_fp32_state():
    """A bf16 model: the UNet gets bf16 inputs, the sampler state and result are fp32, the references come back
    exactly, and the second UNet call sees the oracle's x_t: the first call's bf16 outputs guided and stepped in
    fp32 from the fp32 x_T, then cast to bf16 once."""
    unet, d = tiny_unet().to(torch.bfloat16), Diffusion()
    refs = torch.randn(1, 4, 8, 8).bfloat16()
    ctx, null = torch.randn(2, 7, 8).bfloat16(), torch.randn(1, 7, 8).bfloat16()
    seen = []

    def recording(x, t, context, set_size=1):
        seen.append(x)
        return unet(x, t, context, set_size=set_size)

    with torch.no_grad():
        out = personalize(recording, d, refs=refs, context=ctx, null_context=null, num_new=1, steps=2, guidance=3.0,
                          generator=torch.Generator().manual_seed(0))
    assert {x.dtype for x in seen} == {torch.bfloat16} and out.dtype == torch.float32
    assert torch.equal(out[:1], refs.float())
    with torch.no_grad():  # the oracle: the first call's outputs, guided and stepped in fp32 from the fp32 x_T
        t, t_next = spaced_timesteps(2)
        e_cond, e_0 = unet(seen[0], torch.full((4,), t), torch.cat([ctx, null.expand(2, -1, -1)]), set_size=2).chunk(2)
        e = (e_0.float() + 3.0 * (e_cond.float() - e_0.float()))[1]  # the new image
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))[1]  # sample()'s first draw
    ab, ab_next = d.alphas_cumprod[t].item(), d.alphas_cumprod[t_next].item()
    want = math.sqrt(ab_next) * (x_T - math.sqrt(1 - ab) * e) / math.sqrt(ab) + math.sqrt(1 - ab_next) * e
    got = seen[1][1, :4].float()  # what the UNet got at step 2: the fp32 state, cast to bf16 once
    w = want.bfloat16().float()  # fp32 arithmetic rounds once; a bf16 state rounds each op (60% of values differ)
    assert (got == w).float().mean() > 0.95 and ((got - w).abs() <= w.abs() * 2 ** -7).all()  # else 1 ulp at most


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_same_seed_same_images_with_a_real_unet(sampler):
    unet = tiny_unet()
    args = dict(refs=torch.randn(1, 4, 8, 8), context=torch.randn(3, 7, 8), null_context=torch.zeros(1, 7, 8),
                num_new=2, steps=3, sampler=sampler, eta=0.5)
    with torch.no_grad():
        a = personalize(unet, Diffusion(), generator=torch.Generator().manual_seed(5), **args)
        b = personalize(unet, Diffusion(), generator=torch.Generator().manual_seed(5), **args)
        c = personalize(unet, Diffusion(), generator=torch.Generator().manual_seed(6), **args)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a[1:], c[1:])


def test_jedi_loss_conditioning():
    x0 = torch.randn(6, 4, 5, 5)  # 3 sets of 2
    ctx, null = torch.randn(6, 7, 8), torch.randn(1, 7, 8)
    d = Diffusion()
    spy = Spy()
    jedi_loss(spy, d, x0, ctx, null, set_size=2, p_ref=1.0, p_drop=0.0, generator=torch.Generator().manual_seed(0))
    call = spy.calls[-1]
    torch.testing.assert_close(call["x"][:, 4:8], x0)
    assert call["x"][:, 8].eq(1).all() and call["set_size"] == 2
    assert (call["t"].reshape(3, 2)[:, 0] == call["t"].reshape(3, 2)[:, 1]).all()  # one t per set
    torch.testing.assert_close(call["context"], ctx)
    jedi_loss(spy, d, x0, ctx, null, set_size=2, p_ref=1.0, p_drop=1.0)  # ε⁰: refs zeroed, mask kept, text ""
    call = spy.calls[-1]
    assert torch.count_nonzero(call["x"][:, 4:8]) == 0 and call["x"][:, 8].eq(1).all()
    torch.testing.assert_close(call["context"], null.expand_as(ctx))
    jedi_loss(spy, d, x0, ctx, null, set_size=2, p_ref=1.0, p_drop=0.0, p_drop_text=1.0)  # text only
    call = spy.calls[-1]
    torch.testing.assert_close(call["x"][:, 4:8], x0)
    torch.testing.assert_close(call["context"], null.expand_as(ctx))
    # reference flags are drawn per image with probability p_ref
    flags = []
    for _ in range(200):
        jedi_loss(spy, d, x0, ctx, null, set_size=2, p_ref=0.5)
        flags.append(spy.calls[-1]["x"][:, 8, 0, 0])
    flags = torch.cat(flags)
    assert 0.4 < flags.mean().item() < 0.6


def test_jedi_input_layout():
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    inp = jedi_input(x, r, torch.tensor([1.0, 0.0]))
    assert inp.shape == (2, 9, 3, 3)
    torch.testing.assert_close(inp[0, 4:8], r[0])
    assert torch.count_nonzero(inp[1, 4:]) == 0 and inp[0, 8].eq(1).all()


def test_reference_gain_separates_a_model_that_copies_its_reference_from_one_that_ignores_it():
    from model.diffusion import reference_gain_sums
    d = Diffusion()  # eps-prediction
    img = torch.randn(4, 1, 3, 8, 8)
    x0 = img.expand(4, 2, 3, 8, 8).reshape(8, 3, 8, 8)  # each set: the same image twice, so its reference is exact
    ctx = torch.zeros(8, 77, 4)

    def copier(x, t, context, set_size):  # image 1's ε from its x_t and image 0's reference channels
        ref = x[:, 3:6].reshape(-1, 2, 3, 8, 8)[:, 0].repeat_interleave(2, 0)  # (B·2, C, h, w): each set's image 0
        ab = d.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        return (x[:, :3] - ab.sqrt() * ref) / (1 - ab).sqrt()

    def ignorer(x, t, context, set_size):  # its own x_t only
        return x[:, :3] * 0.5

    own, other = reference_gain_sums(copier, d, x0, ctx, torch.Generator().manual_seed(0))
    assert own < 1e-6 * other and 1 - own / other > 0.99
    own, other = reference_gain_sums(ignorer, d, x0, ctx, torch.Generator().manual_seed(0))
    assert torch.equal(own, other)  # gain exactly 0

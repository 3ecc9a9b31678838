"""train.py end to end on CPU (gloo): torchrun with 2 processes, world-size change on resume, SIGKILL/SIGTERM and
resume (bitwise), init from an original SD checkpoint, NaN stop, export. Each run is a real subprocess."""
import json
import os
import re
import signal
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402  (config globals and helpers only; main() is not run on import)

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def cmd(out, args, nproc=1):
    launcher = TORCHRUN if nproc == 2 else [sys.executable]
    return [*launcher, 'train.py', 'config/tiny.py', f'--out_dir={out}', *args]


def run(out, args, nproc=1, expect_rc=0):
    p = subprocess.run(cmd(out, args, nproc), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == expect_rc, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def start(out, args, name):
    """A single-process run whose log lines the test reads as they come (to signal it mid-run)."""
    err = open(f'{out}.{name}.stderr', 'w')
    return subprocess.Popen(cmd(out, args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=err, text=True)


def signal_at(proc, step, sig):
    """Send `sig` when the log shows `step`; return everything logged until the process ends."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f'step {step} |'):
            proc.send_signal(sig)
    proc.wait(timeout=120)
    return ''.join(lines)


def losses(log):
    return {int(m[1]): float(m[2]) for m in re.finditer(r'^step (\d+) \| loss ([\d.]+)', log, re.M)}


def saved_steps(out):
    root = os.path.join(out, 'ckpt')
    return sorted(int(d[5:]) for d in os.listdir(root) if re.fullmatch(r'step_\d{8}', d)
                  and os.path.isfile(os.path.join(root, d, 'meta.json')))


def checkpoint_tensors(ckpt_dir, tmp_path):
    """Everything a DCP checkpoint holds (model, AdamW moments and steps, EMA), consolidated."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    f = tmp_path / f'{os.path.basename(os.path.dirname(os.path.dirname(ckpt_dir)))}.pt'
    dcp_to_torch_save(ckpt_dir, f)
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f'{prefix}.{k}', v)
        elif isinstance(obj, torch.Tensor):
            flat[prefix] = obj
    walk('', torch.load(f, weights_only=False))
    return flat


def assert_same_tensors(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f'{len(bad)} tensors differ, e.g. {bad[:3]}'


# ----------------------------------------------------------------------------- in process: config and helpers

def test_config_overrides_are_typed_and_unknown_keys_fail(monkeypatch, tmp_path):
    for k in ('learning_rate', 'max_iters', 'set_sizes', 'out_dir', 'compile'):
        monkeypatch.setattr(train, k, getattr(train, k))
    cfg = tmp_path / 'c.py'
    cfg.write_text("import math\n_helper = 3\nmax_iters = 7 * _helper\nset_sizes = [2, 3]\n")
    train.configure([str(cfg), '--learning_rate=1', '--out_dir=runs/a', '--compile=True'])
    assert (train.max_iters, train.set_sizes, train.learning_rate, train.out_dir, train.compile) == \
        (21, (2, 3), 1.0, 'runs/a', True)
    for bad in (['--max_iters=1.5'], ['--no_such_key=1'], ['--compile']):
        with pytest.raises(SystemExit):
            train.configure(bad)
    cfg.write_text("learning_rat = 1e-4\n")  # a typo must not be silently ignored
    with pytest.raises(SystemExit, match='learning_rat'):
        train.configure([str(cfg)])


def test_lr_schedule(monkeypatch):
    for k, v in dict(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, lr_decay='cosine').items():
        monkeypatch.setattr(train, k, v)
    assert train.lr_at(0) == pytest.approx(0.1) and train.lr_at(9) == pytest.approx(1.0)
    assert train.lr_at(60) == pytest.approx(0.55) and train.lr_at(110) == pytest.approx(0.1)
    monkeypatch.setattr(train, 'lr_decay', 'constant')
    assert train.lr_at(100) == 1.0


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    for d in ('step_00000004', 'step_00000008', 'step_00000012', '.tmp_step_00000016'):
        (tmp_path / d).mkdir()
    for d in ('step_00000004', 'step_00000008', '.tmp_step_00000016'):
        (tmp_path / d / 'meta.json').write_text('{}')
    assert train.latest_checkpoint(str(tmp_path)) == str(tmp_path / 'step_00000008')
    assert train.latest_checkpoint(str(tmp_path / 'missing')) is None


def tiny_unet_config():
    from model.unet import UNetConfig
    return UNetConfig(in_channels=7, out_channels=3, model_channels=16, channel_mult=(1, 2), attention_resolutions=(1, 2),
                      num_res_blocks=1, num_heads=2, norm_groups=8, context_dim=16)  # config/tiny.py's UNet


def test_trainee_takes_its_loss_settings_as_arguments(monkeypatch):
    from model.diffusion import Diffusion, jedi_loss
    from model.unet import UNet

    torch.manual_seed(0)
    unet, diffusion = UNet(tiny_unet_config()), Diffusion(schedule='cosine', prediction='v')
    x0, ctx, null = torch.randn(4, 3, 8, 8), torch.randn(4, 77, 16), torch.randn(1, 77, 16)
    settings = dict(p_ref=0.7, p_drop=0.3, p_drop_text=0.2, ref_loss_weight=0.5)
    for k in settings:  # nonsense globals: Trainee must not read them
        monkeypatch.setattr(train, k, -1.0)
    got = train.Trainee(unet, **settings)(x0, 2, torch.Generator().manual_seed(3), diffusion, ctx, null)
    want = jedi_loss(unet, diffusion, x0, ctx, null, 2, generator=torch.Generator().manual_seed(3), **settings)
    other = jedi_loss(unet, diffusion, x0, ctx, null, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want) and not torch.equal(want, other)


def test_channels_last_is_the_same_function():
    """channels_last=True: the first convolution sees NHWC input; the UNet computes the same function."""
    from model.unet import UNet

    torch.manual_seed(0)
    unet = randomize(UNet(tiny_unet_config()), 0).eval()
    x, t, ctx = torch.randn(4, 7, 16, 16), torch.tensor([3, 500, 999, 42]), torch.randn(4, 77, 16)
    with torch.no_grad():
        want = unet(x, t, ctx, set_size=2)
        seen = []
        unet.input_blocks[0][0].register_forward_hook(
            lambda mod, args, out: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        got = train.use_channels_last(unet)(x, t, ctx, set_size=2)
    assert seen == [True] and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mfu_flop_count_never_runs_an_attention_kernel(monkeypatch):
    """train.py's MFU count (flops.py on meta tensors) under JEDI_ATTN=triton: the same FLOPs as under sdpa, attention
    included, and no attention kernel is called (the Triton op and SDPA both raise here)."""
    import kernels
    import kernels.flash_attn
    from flops import unet_flops

    cfg = tiny_unet_config()
    monkeypatch.setattr(train, 'peak_flops', 1e12)
    monkeypatch.setattr(train, 'resolution', 16)
    parts, rt = types.SimpleNamespace(ucfg=cfg, vae=None), types.SimpleNamespace(dev='cpu')

    def kernel(*args, **kwargs):
        raise AssertionError('the FLOP count ran an attention kernel')
    monkeypatch.setattr(kernels.flash_attn, 'flash_attention', kernel)
    monkeypatch.setattr(kernels, 'sdpa_attention', kernel)
    counts = {}
    for backend in ('sdpa', 'triton'):
        monkeypatch.setenv('JEDI_ATTN', backend)
        peak, flops_per_image = train.mfu_setup(parts, rt)
        counts[backend] = flops_per_image(2)
    f = unet_flops(cfg, 16, 2)
    assert peak == 1e12 and f.attention > 0 and counts['triton'] == counts['sdpa'] == f.per_image()


# ----------------------------------------------------------------------------- subprocess runs

def test_torchrun_two_processes_loss_goes_down_then_resume_at_world_size_one(tmp_path):
    from model.loading import load_jedi

    out = str(tmp_path / 'run')  # bf16 compute with fp32 masters and reduction, as on GPUs; a trained text encoder
    log = run(out, ['--overfit_one_batch=True', '--max_iters=30', '--ckpt_interval=15', '--log_interval=1',
                    '--gradient_accumulation_steps=2', '--dtype=bfloat16', '--train_text_encoder=True'], nproc=2)
    loss = losses(log)
    assert sorted(loss) == list(range(1, 31)), 'exactly one log line per step: only rank 0 prints'
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(26, 31)) / 5
    assert last < 0.7 * first, (first, last)
    assert saved_steps(out) == [15, 30]
    assert json.load(open(f'{out}/ckpt/step_00000030/meta.json'))['world_size'] == 2

    # world size 2 -> 1: the resharded checkpoint gives back exactly the EMA weights the 2-process run exported
    run(out, ['--init_from=resume', '--export_only=True', f'--export_path={tmp_path}/w1.safetensors'])
    assert_same_tensors(load_file(f'{out}/jedi.safetensors'), load_file(f'{tmp_path}/w1.safetensors'))
    # ... and training goes on from step 30 (the model and AdamW state came along: no jump back to early losses)
    log = run(out, ['--init_from=resume', '--overfit_one_batch=True', '--max_iters=33', '--log_interval=1',
                    '--ckpt_interval=0'])  # 0: a checkpoint only at the end
    assert 'at step 30 (saved at world size 2, now 1)' in log
    assert saved_steps(out)[-1] == 33 and not {31, 32} & set(saved_steps(out))
    resumed = losses(log)
    assert sorted(resumed) == [31, 32, 33] and max(resumed.values()) < first, (first, resumed)

    jedi = load_jedi(f'{out}/jedi.safetensors')
    assert jedi.vae is None and jedi.meta['space'] == 'pixel' and jedi.meta['step'] == 33
    assert jedi.unet.config.in_channels == 7 and jedi.meta['diffusion']['prediction'] == 'v'
    assert json.load(open(f'{out}/ckpt/step_00000033/meta.json'))['train_text_encoder']
    # the export is the final checkpoint's EMA (UNet and the trained text encoder), not its raw weights
    saved = checkpoint_tensors(f'{out}/ckpt/step_00000033', tmp_path)
    exported = load_file(f'{out}/jedi.safetensors')
    for part, name in (('unet', 'unet'), ('text_encoder', 'text.encoders.0')):  # the conditioner's one encoder
        ema = {k.split(f'.ema.{part}.', 1)[1]: v for k, v in saved.items() if f'.ema.{part}.' in k}
        raw = {k.split(f'.model.{part}.', 1)[1]: v for k, v in saved.items() if f'.model.{part}.' in k}
        assert ema and ema.keys() == raw.keys() == {k[len(name) + 1:] for k in exported if k.startswith(name + '.')}
        assert all(torch.equal(exported[f'{name}.{k}'], v) for k, v in ema.items()), part
        assert not all(torch.equal(exported[f'{name}.{k}'], v) for k, v in raw.items()), part


RECORD_BATCHES = """import json, os, sys
sys.path.insert(0, os.getcwd())
import data, train
_next = data.Loader.__next__
def recorded(self):  # every batch train.py takes from its loader: (loader step, set ids, pixel sum)
    b = _next(self)
    with open(os.environ['BATCH_LOG'] + '.rank' + os.environ.get('RANK', '0'), 'a') as f:
        f.write(json.dumps([b['step'], b['keys'], round(float(b['pixels'].double().sum()), 6)]) + '\\n')
    return b
data.Loader.__next__ = recorded
train.main(sys.argv[1:])
"""


def test_resume_at_another_world_size_continues_the_data_stream(tmp_path):
    """Saved by 2 ranks, resumed by 1: the per-rank loader states do not apply, so the loader starts from the step.
    The resumed run must take exactly the batches an uninterrupted 1-rank run takes at those steps, not the
    first batches again (a job resumed on fewer GPUs must not replay data it has seen)."""
    script = tmp_path / 'record_batches.py'
    script.write_text(RECORD_BATCHES)
    args = ['--max_iters=4', '--gradient_accumulation_steps=2', '--ckpt_interval=0', '--log_interval=1']

    def batches(out, extra, nproc=1):
        env = {**ENV, 'BATCH_LOG': f'{out}.batches'}
        launcher = TORCHRUN if nproc == 2 else [sys.executable]
        p = subprocess.run([*launcher, str(script), 'config/tiny.py', f'--out_dir={out}', *args, *extra], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return [json.loads(line) for line in open(f'{out}.batches.rank0')]

    whole = batches(str(tmp_path / 'whole'), [])  # 1 rank, 2 micro-batches per step: loader steps 0..7
    assert [b[0] for b in whole] == list(range(8))
    cut = str(tmp_path / 'cut')
    batches(cut, ['--max_iters=2'], nproc=2)  # 2 ranks, 1 micro-batch each: steps 0, 1; saved at step 2
    resumed = batches(cut, ['--init_from=resume'])
    assert [b[0] for b in resumed[2:]] == [4, 5, 6, 7]  # after the 2 ranks' own (steps 0, 1) in this log
    assert resumed[2:] == whole[4:]  # the same sets, the same pixels
    assert [b[1] for b in whole[:4]] != [b[1] for b in whole[4:]]  # ... which are not the first ones again


def test_sigterm_and_sigkill_then_resume_end_exactly_like_an_uninterrupted_run(tmp_path):
    args = ['--max_iters=12', '--ckpt_interval=4', '--log_interval=1', '--keep_checkpoints=10']
    whole, cut = str(tmp_path / 'whole'), str(tmp_path / 'cut')
    run(whole, args)

    # SIGTERM: the run finishes its step, saves it and exits cleanly
    log = signal_at(start(cut, args, 'term'), 2, signal.SIGTERM)
    assert 'SIGTERM: stopped after saving step' in log, log
    k = saved_steps(cut)[-1]
    assert 2 <= k < 12 and not os.path.exists(f'{cut}/jedi.safetensors')

    # SIGKILL between checkpoints: whatever was not saved is redone from the last complete checkpoint
    proc = start(cut, args + ['--init_from=resume'], 'kill')
    log = signal_at(proc, k + 3, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, log
    assert f'resumed from {cut}/ckpt/step_{k:08d}' in log
    assert max(losses(log)) < 12
    # a save killed half-way and a checkpoint dir without its completion marker must not be taken for the latest
    good = saved_steps(cut)[-1]
    for d in ('.tmp_step_00000011', 'step_00000011'):
        os.makedirs(f'{cut}/ckpt/{d}', exist_ok=True)
        open(f'{cut}/ckpt/{d}/.metadata', 'wb').write(b'half written')
    log = run(cut, args + ['--init_from=resume'])
    assert f'resumed from {cut}/ckpt/step_{good:08d}' in log
    assert not os.path.exists(f'{cut}/ckpt/.tmp_step_00000011')

    # bitwise: model, AdamW state, EMA, and the exported EMA weights
    assert_same_tensors(checkpoint_tensors(f'{whole}/ckpt/step_00000012', tmp_path),
                        checkpoint_tensors(f'{cut}/ckpt/step_00000012', tmp_path))
    assert_same_tensors(load_file(f'{whole}/jedi.safetensors'), load_file(f'{cut}/jedi.safetensors'))


def randomize(module, seed):
    """Random values in every parameter, zero-initialised output layers too, so the equality below means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith('weight') and p.ndim == 1 else 0.0  # norm scales around 1
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=g))
    return module


def test_init_from_sd_matches_the_source_unet_and_exports(tmp_path):
    """A tiny SD-1.x checkpoint in the original layout; lr 0 so two training steps (VAE, text, AC) change nothing."""
    from model.loading import load_jedi
    from model.text import build_text_encoder, sd14_text_config
    from model.unet import UNet, UNetConfig
    from model.vae import AutoencoderKL, VAEConfig

    unet = randomize(UNet(UNetConfig(in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                     attention_resolutions=(1, 2), num_heads=2, context_dim=32)), 1).eval()
    vae = randomize(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)), 2)
    text = build_text_encoder(sd14_text_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                                               intermediate_size=64))
    sd = {'model.diffusion_model.' + k: v for k, v in unet.state_dict().items()}
    sd.update({'first_stage_model.' + k: v for k, v in vae.state_dict().items()})
    sd.update({'cond_stage_model.transformer.text_model.' + k: v for k, v in text.state_dict().items()})
    sd['cond_stage_model.transformer.text_model.embeddings.position_ids'] = torch.arange(77)[None]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / 'sd.safetensors')

    out = str(tmp_path / 'run')
    log = run(out, ['--init_from=sd', f'--sd_path={tmp_path}/sd.safetensors', '--space=latent', '--num_heads=2',
                    '--max_iters=2', '--learning_rate=0.0', '--activation_checkpointing=True', '--log_interval=1',
                    '--peak_flops=1e9', '--eval_interval=2'])
    assert sorted(losses(log)) == [1, 2], log
    # MFU = 3 x UNet forward FLOPs (flops.py) x images/s / peak: a 1 GFLOP/s "peak" keeps the printed figure
    # (one decimal) precise on a slow CPU
    from flops import unet_flops
    per_image = unet_flops(UNetConfig(in_channels=9, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                      attention_resolutions=(1, 2), num_heads=2, context_dim=32), 8, 2).per_image()
    lines = list(re.finditer(r'^step \d+ \|.* \| ([\d.]+) images/s \|.* \| MFU ([\d.]+)%', log, re.M))
    assert len(lines) == 2, log
    for m in lines:
        want = 100 * 3 * per_image * float(m[1]) / 1e9
        assert abs(float(m[2]) - want) <= 0.05 + 0.01 * want, (m[0], want)
    # the reference-gain evaluation runs (through FSDP, in the compute dtype) and reports a finite number;
    # an untrained JeDi head barely uses references: SD's reference channels are zero, only attn1 couples x_t
    m = re.search(r'step 2 \| ref gain (-?\d+\.\d+)%', log)
    assert m and abs(float(m[1])) < 5, log
    jedi = load_jedi(f'{out}/jedi.safetensors')
    assert jedi.meta['space'] == 'latent' and jedi.meta['resolution'] == 16 and jedi.unet.config.in_channels == 9
    for a, b in ((jedi.vae, vae), (jedi.text.encoders[0], text)):
        assert_same_tensors(a.state_dict(), b.state_dict())
    x, t, ctx = torch.randn(4, 4, 8, 8), torch.tensor([3, 500, 999, 42]), torch.randn(4, 77, 32)
    with torch.no_grad():  # zero reference and mask: exactly SD, also with the set coupled
        for n in (1, 2):
            torch.testing.assert_close(jedi.unet(torch.cat([x, torch.zeros(4, 5, 8, 8)], 1), t, ctx, set_size=n),
                                       unet(x, t, ctx, set_size=n), rtol=0, atol=0)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = str(tmp_path / 'run')
    log = run(out, ['--learning_rate=1e30', '--warmup_iters=0', '--ckpt_interval=1', '--log_interval=1'], expect_rc=1)
    m = re.search(r'stopping: loss (\S+) / grad norm (\S+) at step (\d+)', log)
    assert m, log
    bad = int(m[3])
    assert saved_steps(out)[-1] == bad - 1 and f'last good checkpoint is {out}/ckpt/step_{bad - 1:08d}' in log
    assert not os.path.exists(f'{out}/jedi.safetensors')
    # a fresh run must not write into a directory that holds another run's checkpoints
    p = subprocess.run(cmd(out, []), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and 'holds checkpoints of another run' in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_compile_and_activation_checkpointing_train(tmp_path):
    log = run(str(tmp_path / 'run'), ['--compile=True', '--activation_checkpointing=True', '--max_iters=3',
                                      '--log_interval=1'])
    assert sorted(losses(log)) == [1, 2, 3]

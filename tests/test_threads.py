"""What one thread does never reaches another thread's forward in the middle of it.

Each interleaving is forced, not hoped for: a hook on the first layer stops a forward there,
another thread acts (``harden``, a ``cached()`` pass, an evaluation), then the forward goes on.
Each forward must compute every weight with one hardness, with its own values and gradients.
The last tests repeat the issue's free-running races.
"""

import contextlib
import threading
import time

import torch
from layers import same_bits, scaled
from torch import nn

import nwave_param as nwp
from nwave_param import functional

X = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))


def network(hardness=0.0):
    torch.manual_seed(0)
    model = scaled(nn.Sequential(*[nn.Linear(6, 6) for _ in range(4)]), 3)
    return model, nwp.register(model).harden(hardness)


def definition(reg, hardness):
    """Each layer's weight at ``hardness``, by the definition."""
    return [functional.harden(w.detach(), layout, reg.spec, hardness) for w, layout in zip(reg.latent_weights(), reg.layouts)]


def recorded_forward(model, grad=False):
    """``model(X)``, through its own call (its hooks run), and the weight each layer computed with."""
    seen, me = [], threading.current_thread()

    def record(module, args):
        if threading.current_thread() is me:  # not another thread's forward of the same model
            seen.append(module.weight)

    handles = [layer.register_forward_pre_hook(record) for layer in model]
    try:
        with torch.set_grad_enabled(grad):
            out = model(X)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def interleaved(model, forward, meanwhile):
    """Run ``forward()`` in a thread of its own and stop it once ``model[0]`` has run; then enter
    the context manager ``meanwhile()`` here, let the forward finish, and leave it.  Returns what
    ``forward`` returned, or raises what it raised."""
    paused, resume, result = threading.Event(), threading.Event(), {}

    def stop(module, args, output):
        if threading.current_thread() is thread and not paused.is_set():  # the forward's thread, once
            paused.set()
            assert resume.wait(10)

    def run():
        try:
            result["value"] = forward()
        except BaseException as error:  # noqa: BLE001 - raised again in the test's thread
            result["error"] = error
        finally:
            paused.set()

    handle = model[0].register_forward_hook(stop)
    thread = threading.Thread(target=run)
    try:
        with contextlib.ExitStack() as stack:
            thread.start()
            assert paused.wait(10)
            stack.enter_context(meanwhile())
            resume.set()
            thread.join(10)
    finally:
        resume.set()
        handle.remove()
    assert not thread.is_alive()
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_a_harden_from_another_thread_takes_effect_at_the_next_forward_never_in_the_middle_of_one():
    model, reg = network(0.0)

    @contextlib.contextmanager
    def harden():
        reg.harden(1.0)
        yield

    _, seen = interleaved(model, lambda: recorded_forward(model), harden)
    assert all(same_bits(a, b) for a, b in zip(seen, definition(reg, 0.0), strict=True))  # all four at 0
    _, seen = recorded_forward(model)
    assert all(same_bits(a, b) for a, b in zip(seen, definition(reg, 1.0), strict=True))  # the next at 1


def test_a_pass_open_in_another_thread_never_serves_a_forward():
    """Thread A opens ``cached()`` and evaluates under no_grad while B's training forward is
    half-way; A's pass stays open until B finishes.  B computes its own values, and its latent
    weights all get their gradients."""
    model, reg = network(0.5)

    @contextlib.contextmanager
    def evaluation_in_a_pass():
        with reg.cached(), torch.no_grad():
            model(X)
            yield

    out, seen = interleaved(model, lambda: recorded_forward(model, grad=True), evaluation_in_a_pass)
    assert all(w.grad_fn is not None for w in seen)  # none of A's no-grad values
    assert all(same_bits(a, b) for a, b in zip(seen, definition(reg, 0.5), strict=True))
    out.sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in reg.latent_weights())


def test_harden_inside_a_pass_takes_effect_at_the_next_read():
    for entered in (0.0, 0.5):  # a pass entered at 0 reads the latent weights; at 0.5 computes them
        model, reg = network(entered)
        with reg.cached():
            before = [layer.weight for layer in model]
            reg.harden(1.0)
            _, seen = recorded_forward(model)
        assert all(same_bits(a, b) for a, b in zip(before, definition(reg, entered), strict=True))
        assert all(same_bits(a, b) for a, b in zip(seen, definition(reg, 1.0), strict=True))


def test_harden_in_the_middle_of_a_forward_in_the_same_thread_waits_for_the_next_forward():
    model, reg = network(0.0)
    model[1].register_forward_pre_hook(lambda module, args: reg.harden(1.0) and None)
    for cached in (contextlib.nullcontext, reg.cached):
        reg.harden(0.0)
        with cached():
            _, seen = recorded_forward(model)
        assert all(same_bits(a, b) for a, b in zip(seen, definition(reg, 0.0), strict=True))


def race(model, action, forwards=300):
    """Run ``action(stop)`` in a thread while this thread runs recorded training forwards of
    ``model``; return the weights each one computed with."""
    stop, results = threading.Event(), []
    thread = threading.Thread(target=action, args=(stop,))
    thread.start()
    try:
        for _ in range(forwards):
            results.append(recorded_forward(model, grad=True)[1])
    finally:
        stop.set()
        thread.join(10)
    return results


def test_free_running_harden_never_mixes_hardness_in_one_forward():
    model, reg = network(0.0)
    soft, hard = definition(reg, 0.0), definition(reg, 1.0)

    def toggle(stop):
        while not stop.is_set():
            reg.harden(1.0)
            time.sleep(0)  # lets the forward's thread take the GIL between toggles, as a real trainer's would
            reg.harden(0.0)
            time.sleep(0)

    for seen in race(model, toggle):
        assert all(same_bits(a, b) for a, b in zip(seen, soft)) or all(same_bits(a, b) for a, b in zip(seen, hard))


def test_free_running_passes_never_crash_or_serve_another_threads_forward():
    model, reg = network(0.5)
    want = definition(reg, 0.5)

    def passes(stop):
        while not stop.is_set():
            with reg.cached(), torch.no_grad():
                [layer.weight for layer in model]
            time.sleep(0)

    for seen in race(model, passes):
        assert all(same_bits(a, b) for a, b in zip(seen, want, strict=True))
        assert all(w.grad_fn is not None for w in seen)  # its own values, not the pass's no-grad ones

"""Figures for users: training curves, reconstructions, field traversals, flows and transport.

Every function takes plain tensors / a run directory, writes PNG (or GIF) files with matplotlib's
Agg backend and returns the paths it wrote. Nothing here is imported by the training hot path.
"""
from __future__ import annotations

# --- model plots (sta plot RUN_DIR): loss curves, reconstructions, traversals, latent flows ---

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _image_grid(images, rows: int, cols: int, pad: int = 1):
    """``images: (rows*cols, C, S, S)`` tensor in [0, 1] -> one ``(H, W, C)`` numpy array."""
    import torch

    images = images.detach().float().clamp(0, 1).cpu()
    n, c, s, _ = images.shape
    grid = torch.ones(c, rows * (s + pad) + pad, cols * (s + pad) + pad)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[:, pad + r * (s + pad):pad + r * (s + pad) + s, pad + col * (s + pad):pad + col * (s + pad) + s] = images[i]
    array = grid.permute(1, 2, 0).numpy()
    return array[..., 0] if c == 1 else array


def plot_loss_curves(metrics_file: str, path: str) -> str:
    """Every ELBO term of ``metrics.jsonl`` against the step (log scale for positive terms)."""
    import json

    plt = _pyplot()
    records = []
    with open(metrics_file) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:  # blank, or cut short by a kill mid-write
                continue
    keys = ["loss", "recon", "kl_path", "kl_spike", "kl_slab", "hj"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, key in zip(axes.flat, keys):
        # a skipped (non-finite) step logs null: leave it out of the curve
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        steps, values = [p[0] for p in points], [p[1] for p in points]
        ax.plot(steps, values, lw=1)
        if values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_reconstructions(model, x, path: str, examples: int = 4) -> str:
    """Rows per example: the true frames, then the prediction rolled forward from x_0 with the
    inferred coefficients (frame 0 is the plain reconstruction). ``x: (N, T+1, C, S, S)``."""
    import torch

    plt = _pyplot()
    x = x[:examples]
    with torch.no_grad():
        mu, _ = model.encode(x[:, 0])
        g, _ = model.infer_coefficients(x)
        pred = model.mean_image(model.rollout(mu, g).flatten(0, 1)).view_as(x)
    n, T1 = x.shape[:2]
    images = torch.stack([x, pred], 1).flatten(0, 2)  # rows: true_0, pred_0, true_1, ...
    fig, ax = plt.subplots(figsize=(T1 * 0.9, 2 * n * 0.9 + 0.5))
    ax.imshow(_image_grid(images, 2 * n, T1), cmap="gray")
    ax.set_title("odd rows: true frames; even rows: rolled forward from x_0 with inferred coefficients")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def field_traversals(model, x0, steps: int):
    """Decode the path of each field switched on alone at unit speed from every ``x0: (N, C, S, S)``.

    Returns ``(K, N, steps+1, C, S, S)`` mean images.
    """
    import torch

    with torch.no_grad():
        mu, _ = model.encode(x0)
        out = []
        for k in range(model.config.num_fields):
            z = model.rollout(mu, model.coefficients.unit(k, x0.shape[0], steps))
            out.append(model.mean_image(z.flatten(0, 1)).view(x0.shape[0], steps + 1, *x0.shape[1:]))
    return torch.stack(out)


def plot_traversals(model, x0, directory: str, steps: int = 8, names=None) -> list:
    """One PNG grid (rows: examples, columns: steps) and one animated GIF per learned field."""
    import os

    from PIL import Image

    plt = _pyplot()
    paths = []
    trav = field_traversals(model, x0, steps)
    for k in range(trav.shape[0]):
        n = trav.shape[1]
        fig, ax = plt.subplots(figsize=((steps + 1) * 0.9, n * 0.9 + 0.5))
        ax.imshow(_image_grid(trav[k].flatten(0, 1), n, steps + 1), cmap="gray")
        ax.set_title(f"field {k}" + (f" (matched: {names[k]})" if names and names[k] else "") + ", unit speed")
        ax.axis("off")
        fig.tight_layout()
        path = os.path.join(directory, f"traversal_field{k}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
        frames = []
        for t in range(steps + 1):
            array = _image_grid(trav[k, :, t], 1, n)
            array = (array * 255).round().astype("uint8")
            frame = Image.fromarray(array).resize((array.shape[1] * 3, array.shape[0] * 3), Image.NEAREST)
            frames.append(frame.convert("P") if array.ndim == 3 else frame)
        gif = os.path.join(directory, f"traversal_field{k}.gif")
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=250, loop=0)
        paths.append(gif)
    return paths


def _latent_slice(model, x0):
    """The 2-D slice of latent space the flow plots show: ``(centre (D,), dims [d0, d1], spread (D,))``:
    through the posterior mean of ``x0[0]``, along the two latent coordinates in which the encoded
    ``x0: (N, C, S, S)`` vary most (spread = their standard deviation over the N images)."""
    import torch

    with torch.no_grad():
        mu, _ = model.encode(x0)
        spread = mu.std(0) if mu.shape[0] > 1 else torch.ones_like(mu[0])
        dims = spread.argsort(descending=True)[:2].tolist()
        return mu[0], dims, spread


def _unit_coefficients(model, field: int, n: int = 1):
    """``(g_pot (n, K), g_rot (n, K) or None)``: field ``field`` alone at unit speed (both parts with
    double control)."""
    return model.split_coefficients(model.coefficients.unit(field, n))


def plot_latent_flows(model, x0, path: str, resolution: int = 15, t: int = 0, names=None) -> str:
    """The velocity of each field (unit coefficient) on a 2-D slice of latent space, coloured by
    its divergence. The slice passes through the posterior mean of ``x0[0]`` along the two latent
    coordinates in which the encoded ``x0: (N, C, S, S)`` vary most.

    names: the true transformation matched to each field (eval.json ``field_assignment``, the
    evaluation's Hungarian matching), shown in the titles; None: titles say the fields are unmatched.
    Arrows share one scale per panel: the longest spans 0.9 grid spacings (its length, max |v|, is in
    the title), so a slow field is as readable as a fast one."""
    import torch

    plt = _pyplot()
    K = model.config.num_fields
    centre, dims, spread = _latent_slice(model, x0)
    with torch.no_grad():
        axes_values = [torch.linspace(centre[d] - 2.5 * spread[d], centre[d] + 2.5 * spread[d], resolution) for d in dims]
        a, b = torch.meshgrid(axes_values[0], axes_values[1], indexing="xy")
        z = centre.repeat(resolution * resolution, 1)
        z[:, dims[0]], z[:, dims[1]] = a.flatten(), b.flatten()
        fig, axes = plt.subplots(1, K, figsize=(4.2 * K, 4), squeeze=False)
        for k in range(K):
            # the kind's own transition (fields, or constant directions for linear / slowvae)
            out = model.step(z, t, model.coefficients.unit(k, z.shape[0]), outputs=("z", "div"), backend="torch")
            velocity, div = out.z - z, out.div
            ax = axes[0, k]
            u, w = velocity[:, dims[0]], velocity[:, dims[1]]
            longest = (u.square() + w.square()).sqrt().max().item()
            spacing = min((v[1] - v[0]).item() for v in axes_values)
            q = ax.quiver(a.numpy(), b.numpy(), u.view(resolution, resolution).numpy(),
                          w.view(resolution, resolution).numpy(), div.view(resolution, resolution).numpy(),
                          cmap="coolwarm", angles="xy", scale_units="xy", scale=max(longest, 1e-12) / (0.9 * spacing),
                          width=0.007, headwidth=3.5, headlength=4, pivot="mid")
            fig.colorbar(q, ax=ax, label="divergence")
            matched = f"matched: {names[k]}" if names and names[k] else "unmatched"
            ax.set_title(f"field {k} ({matched})\nunit speed, t = {t}, max |v| = {longest:.2g}", fontsize=11)
            ax.set_xlabel(f"z[{dims[0]}]")
            ax.set_ylabel(f"z[{dims[1]}]")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: str, examples: int = 4) -> list:
    """Every figure of a run directory into RUN_DIR/plots/; returns the paths written."""
    import json
    import os

    from .train import load_data, load_run

    config, model, ckpt = load_run(run_dir)
    directory = os.path.join(run_dir, "plots")
    os.makedirs(directory, exist_ok=True)
    paths, names = [], None  # names: the true transformation matched to each field, from eval.json
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        paths.append(plot_loss_curves(metrics, os.path.join(directory, "loss_curves.png")))
    x, _ = load_data(config, "test", num_sequences=max(examples, 16))
    paths.append(plot_reconstructions(model, x, os.path.join(directory, "reconstructions.png"), examples))
    if model.has_transitions:
        names = None
        eval_file = os.path.join(run_dir, "eval.json")
        if os.path.exists(eval_file):
            with open(eval_file) as f:
                evaluation = json.load(f)
            if evaluation.get("step") == ckpt["step"]:  # a stale eval.json matched other weights
                names = evaluation.get("field_assignment")
        paths += plot_traversals(model, x[:examples, 0], directory, steps=config.T, names=names)
        paths.append(plot_latent_flows(model, x[:, 0], os.path.join(directory, "latent_flows.png"), names=names))
    if model.has_fields:  # learned fields (not linear / slowvae: constant directions)
        name = names[0] if names and names[0] else None
        paths.append(plot_field_transport(model, x[:, 0], os.path.join(directory, "grid_transport_field0.png"),
                                          title=f"field 0 ({'matched: ' + name if name else 'unmatched'}), unit speed"))
    return paths


def plot_field_transport(model, x0, path: str, field: int = 0, time: float = 2.0, t: float = 0.0,
                         shape=(64, 64), particles: int = 2000, title=None) -> str:
    """Density evolution under one learned field (unit speed, alone) on the latent slice of
    :func:`plot_latent_flows`, next to the particle picture: :func:`plot_grid_transport` on the
    model's field bank. ``x0: (N, C, S, S)`` chooses the slice; ``time`` is in transitions.

    The half-width is 2.5 latent standard deviations, or twice the in-plane distance the field
    moves the centre in ``time`` if that is larger (so the bump, of std extent / 4, stays in view).
    """
    import torch

    from .ops import flow_step

    centre, dims, spread = _latent_slice(model, x0)
    g_pot, g_rot = _unit_coefficients(model, field)
    with torch.no_grad():
        v = flow_step(centre[None], float(t), g_pot, g_rot, model.fields, backend="torch").z[0] - centre
    extent = max(2.5 * max(spread[dims[0]].item(), spread[dims[1]].item()), 2 * time * v[dims].norm().item(), 1e-3)
    return plot_grid_transport(model.fields, path, center=centre, dims=dims, extent=extent, shape=shape,
                               g_pot=g_pot[0], g_rot=None if g_rot is None else g_rot[0], t=t, time=time,
                               particles=particles, title=title)


# --- latent grid transport plots (sta.grid): density evolution next to the particle picture ---

def plot_grid_transport(fields, path: str, *, center=None, dims=(0, 1), extent: float = 3.0, shape=(96, 96),
                        g_pot=None, g_rot=None, t: float = 0.0, time: float = 2.0, frames: int = 4,
                        sigma=None, particles: int = 3000, backend: str = "auto", title=None) -> str:
    """The Eulerian and Lagrangian pictures of one field mix, side by side, over ``time``.

    Top row: a Gaussian bump (std ``sigma``, default extent / 4, centred on ``center`` in the plane
    ``dims``) transported on a :func:`sta.latent_grid` by :func:`sta.transport_for` (the flow's
    in-plane velocity, zero-flux walls), at ``frames`` equally spaced times; the first panel carries
    the velocity arrows. Bottom row: particles drawn from the same bump and moved by
    :func:`sta.flow_step` (:func:`sta.grid.advect_particles`, Euler steps of ~0.05), coloured by their
    log-density carried with ``logq - dt * div``. With D == len(dims) == 2 both rows solve the same
    continuity equation; with D > 2 the particles move in all D coordinates and are shown projected.

    Args:
        fields: a :class:`sta.FieldBank`; center: (D,) (default 0); g_pot: (Kp,) / g_rot: (Kr,)
            coefficients (or floats, or None); t: the field time; others as in :func:`sta.latent_grid`.
        path: the PNG to write; title: a line above both rows (e.g. which field). Returns ``path``.
    """
    import math

    import torch

    from .grid import advect_particles, latent_grid, transport_for

    plt = _pyplot()
    like = next(fields.parameters())
    D = fields.dim
    center = torch.zeros(D, dtype=like.dtype) if center is None else torch.as_tensor(center, dtype=like.dtype)
    sigma = extent / 4 if sigma is None else sigma
    dims = tuple(dims)
    with torch.no_grad():
        grid = latent_grid(fields, center, dims, extent, shape, g_pot=g_pot, g_rot=g_rot, t=t, backend=backend)
        plane = grid.points[..., list(dims)] - center[list(dims)].to(grid.points.device)
        rho = torch.exp(-(plane ** 2).sum(-1) / (2 * sigma ** 2)) / (2 * math.pi * sigma ** 2)
        gen = torch.Generator().manual_seed(0)
        z = center.expand(particles, D).clone()
        offsets = sigma * torch.randn(particles, 2, generator=gen, dtype=like.dtype)
        z[:, list(dims)] += offsets
        z = z.to(like.device)
        logq = (-(offsets ** 2).sum(-1) / (2 * sigma ** 2) - math.log(2 * math.pi * sigma ** 2)).to(like.device)
        times = [time * k / max(1, frames - 1) for k in range(frames)]
        densities, clouds = [rho], [(z, logq)]
        for k in range(1, frames):
            span = times[k] - times[k - 1]
            densities.append(transport_for(densities[-1], grid.faces, grid.dx, span, backend="auto"))
            steps = max(1, math.ceil(span / 0.05))
            clouds.append(advect_particles(fields, *clouds[-1], span, steps, g_pot=g_pot, g_rot=g_rot, t=t,
                                           backend=backend))
    (lo0, hi0), (lo1, hi1) = [(e[0].item(), e[-1].item()) for e in grid.edges]
    vmax = max(d.max().item() for d in densities)
    lq_all = torch.cat([c[1] for c in clouds]).cpu()
    lq_lo, lq_hi = torch.quantile(lq_all, 0.02).item(), lq_all.max().item()
    # constrained layout: room for the row colour bars and the title (tight_layout cannot place them)
    fig, axes = plt.subplots(2, frames, figsize=(3.3 * frames + 1.2, 7.0), squeeze=False, layout="constrained")
    for k in range(frames):
        ax = axes[0, k]
        image = ax.imshow(densities[k].T.cpu().numpy(), origin="lower", extent=(lo0, hi0, lo1, hi1), cmap="magma",
                          vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(f"grid, t = {times[k]:.2f}\nmass {densities[k].sum().item() * grid.dx[0] * grid.dx[1]:.3f}",
                     fontsize=11)
        if k == 0:
            step = max(1, shape[0] // 16)
            c0, c1 = grid.coords[0][::step].cpu(), grid.coords[1][::step].cpu()
            v = grid.plane[::step, ::step].cpu()
            # longest arrow = 0.9 arrow spacings (matplotlib's default autoscale drew them tiny)
            longest = max(v.norm(dim=-1).max().item(), 1e-12)
            ax.quiver(*torch.meshgrid(c0, c1, indexing="ij"), v[..., 0], v[..., 1], color="white", alpha=0.8,
                      angles="xy", scale_units="xy", scale=longest / (0.9 * step * min(grid.dx)), pivot="mid")
        ax = axes[1, k]
        zk, lq = clouds[k]
        zk = zk.cpu()
        cloud = ax.scatter(zk[:, dims[0]], zk[:, dims[1]], c=lq.cpu().clamp(lq_lo, lq_hi), s=2, cmap="magma",
                           vmin=lq_lo, vmax=lq_hi)
        ax.set_xlim(lo0, hi0)
        ax.set_ylim(lo1, hi1)
        ax.set_title(f"particles, t = {times[k]:.2f}", fontsize=11)
        for a in axes[:, k]:
            a.set_xlabel(f"z[{dims[0]}]")
            a.set_ylabel(f"z[{dims[1]}]")
    fig.colorbar(image, ax=axes[0, :].tolist(), label="density on the grid")
    fig.colorbar(cloud, ax=axes[1, :].tolist(), label="particle log-density log q")
    if title:
        fig.suptitle(title, fontsize=13)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

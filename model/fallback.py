"""The checks between the router's choice and the expert that runs (issue 18, do no harm), and their reasons.

The router picks a leaf and a level. A blind image then runs only at a path node whose support, and every
support above it, holds its embedding (`DegradationTree.supported_levels`: a type node runs only within its
trusted core, its leaves within the whole support above them), no deeper than where a clean
leaf's support claims it (`clean_claim`), and above the first node whose dark channel floor or brightness ceiling
minimum it does not reach, or whose ceiling maximum (a node that brightened dim images only) it passes
(`Calibration.light_depth`); within that, the calibration bank's nearest samples vote
level by level (`Calibration.check`), and where they gained clearly through a deeper node, they take the image down
to it (`Calibration.promote`): past the router's level, and past the support too, but never into a type's own outer
shell (`DegradationTree.open_to_evidence`) and never past the clean and light checks. A node that would run in a
type's outer shell without that clear evidence runs only if its expert keeps the image's exposure (the exposure
guard, `UniRestorer.route`, which passes what it bars as `barred`). `fallback_reason` says which of these set the
level.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .calibration import HARM_DB, HELPED_CEILING_FACTOR, PROMOTE_GAIN_DB, Calibration, Verdict
from .router import Route
from .tree import DegradationTree, deepest_level

# the exposure guard: the largest shift of mean luminance (in [0, 1]) an expert may make in a type's outer shell,
# measured on the image shrunk to at most GUARD_SIDE pixels a side (exposure is global; a large photo untiled would
# not fit a GPU)
EXPOSURE_SHIFT, GUARD_SIDE = 0.05, 256


def fall_back(route: Route, embedding: Tensor, tree: DegradationTree, leaf_paths: Tensor,
              task_index: Tensor | None = None, calibration: Calibration | None = None,
              floors: Tensor | None = None, ceilings: Tensor | None = None, barred: Tensor | None = None) -> Route:
    """`route` with each blind image's level set by the checks (module docstring): capped by the support, the
    clean claim and the light check (`floors`, `ceilings`: the images' dark channel floors and brightness
    ceilings), then the bank's vote below the router's level, or its promotion past it (and past the support, where
    `route.past_support`); `barred` [B, n_levels]:
    levels that may not run (the exposure guard's, `UniRestorer.route`); images with a task (index >= 0) keep
    their level. `route.shell` says where the node that runs lies in a type's outer shell."""
    if tree.radii is None and calibration is None:
        return route
    paths = leaf_paths[route.leaf]
    clean_depth, clean_leaf = tree.clean_claim(embedding, paths)
    allowed = tree.supported_levels(embedding, paths)  # a type node's outer shell bars only its own expert
    open_levels = tree.open_to_evidence(embedding, paths)  # where clear evidence passes the support
    if barred is not None:
        allowed &= ~barred.to(allowed.device)
        open_levels &= ~barred.to(allowed.device)
    supported = deepest_level(allowed)
    hard = torch.minimum(supported, clean_depth)  # the vote's bound; only clear evidence passes the support
    if calibration is not None and floors is not None and ceilings is not None:
        light_depth, light_node, by_ceiling = calibration.light_depth(floors, ceilings, paths)
    else:  # no bank: nothing refused here
        light_depth, light_node = torch.full_like(hard, paths.shape[1] - 1), torch.full_like(hard, -1)
        by_ceiling = torch.zeros_like(hard, dtype=torch.bool)
    cap = torch.minimum(route.level, hard)
    by_light = light_depth < cap
    cap = deepest_level(allowed, torch.minimum(cap, light_depth))
    verdict = calibration.check(embedding, paths, cap, allowed=allowed) if calibration is not None else None
    level = verdict.depth if verdict is not None else cap
    promoted = torch.zeros_like(level, dtype=torch.bool)
    if calibration is not None:
        reach = deepest_level(open_levels, torch.minimum(clean_depth, light_depth))  # evidence passes the support
        deeper = calibration.promote(embedding, paths, reach, open_levels).depth
        promoted = deeper > level
        level = torch.where(promoted, deeper, level)
    if task_index is not None:
        promoted &= task_index < 0
        level = torch.where(task_index >= 0, route.level, level)
    fell = level < route.level
    route.clean_leaf = torch.where(fell & (level == cap) & ~by_light & (clean_depth < supported), clean_leaf, -1)
    route.floor_node = torch.where(fell & (level == cap) & by_light & ~by_ceiling, light_node, -1)
    route.ceiling_node = torch.where(fell & (level == cap) & by_light & by_ceiling, light_node, -1)
    route.floor, route.ceiling = floors, ceilings
    route.router_level, route.level = route.level, level
    route.node = paths.gather(1, level[:, None]).squeeze(1)
    route.past_support = promoted & ~allowed.gather(1, level[:, None]).squeeze(1)
    route.shell = tree.in_shell(embedding, paths).gather(1, level[:, None]).squeeze(1)
    if task_index is not None:
        route.shell &= task_index < 0
    if verdict is not None:
        route.refused = torch.where(fell & (level < cap), verdict.refused, -1)
        route.promoted = torch.where(promoted, route.node, -1)
        evidence = _evidence(verdict)
        if bool(promoted.any()):  # the evidence at the node promotion took
            taken = calibration.promote(embedding, paths, level, open_levels)
            evidence = torch.where(promoted[:, None], _evidence(taken), evidence)
        route.evidence = evidence
    if tree.radii is not None:
        route.support = tree.distances(embedding, paths) / tree.radii.to(paths.device)[paths]
    return route


def _evidence(verdict: Verdict) -> Tensor:
    """[B, 3]: neighbours through the node of the verdict's cap level, their mean gain (dB), how many it harmed."""
    return torch.stack([verdict.members.float(), verdict.gain, verdict.harmed.float()], 1)


def fallback_reason(route: Route, i: int, out: dict, tree: DegradationTree, leaf_paths: Tensor,
                    calibration: Calibration | None) -> str | None:
    """Why image i runs at another level than the router chose (`out`: its `describe` entry), or None."""
    past = route.past_support is not None and bool(route.past_support[i])
    if route.router_level is None or (int(route.router_level[i]) == out["level"] and not past):
        return None
    node, path = out["node"], leaf_paths[int(route.leaf[i])].tolist()
    nearest = f"of the {calibration.neighbours} calibration samples nearest to it" if calibration is not None else ""
    promoted = int(route.promoted[i]) if route.promoted is not None else -1
    refused = int(route.refused[i]) if route.refused is not None else -1
    floor_node = int(route.floor_node[i]) if route.floor_node is not None else -1
    ceiling_node = int(route.ceiling_node[i]) if route.ceiling_node is not None else -1
    clean = int(route.clean_leaf[i]) if route.clean_leaf is not None else -1
    exposure = int(route.exposure_node[i]) if route.exposure_node is not None else -1
    if exposure >= 0:
        why = (f"node {exposure} lies in a type's outer shell for it, where a dark photo and low light look alike, "
               f"and its expert would move the image's mean luminance by {float(route.exposure_shift[i]):.3f} "
               f"(more than {EXPOSURE_SHIFT})")
    elif promoted >= 0:
        members, gain, harmed = route.evidence[i].tolist()
        why = (f"{nearest}, {members:.0f} went through node {promoted}, which gained {gain:+.2f} dB on average "
               f"(at least {PROMOTE_GAIN_DB:g}) over the node kept above it and harmed {harmed:.0f} of them "
               f"(> {HARM_DB} dB)")
        if past:
            why = f"the image lies outside the support the tree trusts for node {promoted}, but {why}"
    elif refused >= 0:
        members, gain, harmed = route.evidence[i].tolist()
        why = (f"only {members:.0f} {nearest} went through node {refused}, too few to vouch for it"
               if members < calibration.min_members else
               f"{nearest}, {members:.0f} went through node {refused}, which gained {gain:+.2f} dB on average "
               f"over node {node} and harmed {harmed:.0f} of them (> {HARM_DB} dB)")
    elif floor_node >= 0:
        why = (f"its dark channel floor {float(route.floor[i]):.3f} lies below "
               f"{float(calibration.floor_min[floor_node]):.3f}, that of all but "
               f"{calibration.floor_quantile:.0%} of the calibration samples node {floor_node} did not "
               f"harm (haze lifts every pixel: its darkest patches are darker than theirs)")
    elif ceiling_node >= 0 and float(route.ceiling[i]) > float(calibration.ceiling_max[ceiling_node]):
        why = (f"its brightness ceiling {float(route.ceiling[i]):.3f} lies above "
               f"{float(calibration.ceiling_max[ceiling_node]):.3f}, {HELPED_CEILING_FACTOR:g} times that of all but "
               f"{calibration.ceiling_quantile:.0%} of the calibration samples node {ceiling_node} helped (it "
               f"brightened dim images only; this one's highlights are bright)")
    elif ceiling_node >= 0:
        why = (f"its brightness ceiling {float(route.ceiling[i]):.3f} lies below "
               f"{float(calibration.ceiling_min[ceiling_node]):.3f}, that of all but "
               f"{calibration.ceiling_quantile:.0%} of the calibration samples node {ceiling_node} did "
               f"not harm (low light dims every pixel: its highlights are dimmer than theirs)")
    elif clean < 0:
        outside = path[out["level"] + 1]
        trusted = tree.trusted_fraction(outside)
        why = (f"the image lies outside the {'trusted' if trusted < 1 else 'training'} support of node "
               f"{outside} ({out['support'][out['level'] + 1]:.2f}x its radius"
               f"{f'; trusted within {trusted}x' if trusted < 1 else ''})")
    else:
        why = f"the image lies inside the training support of clean node {clean} (it may be clean)"
    return f"router chose level {int(route.router_level[i])}; {why}, so level {out['level']} (node {node}) restores it"

"""Regenerate the PtychoPINN known-answer fixtures of tests/test_ptychopinn.py.

Not run by gpugroup's CI (it never installs TensorFlow or PtychoPINN). Run it in an
environment with PtychoPINN's CPU dependencies and PtychoPINN's sources on PYTHONPATH:

    PYTHONPATH=/path/to/PtychoPINN python tests/data/make_ptychopinn_fixtures.py COMMIT

It records what PtychoPINN (unpatched) computes for small inputs, as facts:
``ptychopinn_kat.npz`` (inputs and outputs of its ``ptycho.raw_data`` helpers and of
``RawData._generate_dataset_from_groups`` for fixed groups, and of
``RawData.from_simulation`` with its intensity scale and noise-free amplitudes),
``ptychopinn_kat.json`` (its constants, the commit, the shapes and dtypes its
``loader.load`` produces from a grouped dict), ``ptychopinn_metadata.npz`` (written by its ``MetadataManager``) and
``ptychopinn_to_file.npz`` (written by its ``RawData.to_file`` with objectGuess=None).
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main(commit):
    from ptycho import loader, params
    from ptycho import raw_data as prd
    from ptycho.metadata import MetadataManager

    rng = np.random.default_rng(20261206)
    out = {}
    facts = {"upstream": "github.com/hoidn/PtychoPINN", "commit": commit,
             "local_offset_sign": prd.local_offset_sign,
             "key_coords_offsets": prd.key_coords_offsets,
             "key_coords_relative": prd.key_coords_relative}

    # get_image_patches at gridsize 1 and 2 (fractional offsets; one patch off the edge)
    obj = (rng.random((24, 24)) * np.exp(1j * rng.random((24, 24)))).astype(np.complex64)
    out["gip_object"] = obj
    for gs, B in ((1, 5), (2, 3)):
        C = gs * gs
        g = rng.uniform(3, 20, size=(B, 1, 2, 1))
        g[-1, 0, :, 0] = (1.25, 22.5)
        loc = rng.uniform(-2, 2, size=(B, 1, 2, C)) if C > 1 else np.zeros((B, 1, 2, 1))
        res = prd.get_image_patches(obj, g, loc, N=8, gridsize=gs)
        out[f"gip{gs}_global"], out[f"gip{gs}_local"] = g, loc
        out[f"gip{gs}_out"] = np.asarray(res)

    # get_relative_coords
    cnn = rng.uniform(-50, 50, size=(4, 1, 2, 4))
    off, rel = prd.get_relative_coords(cnn)
    out.update(grc_in=cnn, grc_offsets=off, grc_relative=rel)

    # normalize_data: float32 and uint16 (counts)
    d32 = rng.random((3, 8, 8, 4)).astype(np.float32)
    d16 = rng.integers(0, 900, size=(3, 8, 8, 4)).astype(np.uint16)
    out.update(norm_f32_in=d32, norm_f32_out=prd.normalize_data({"diffraction": d32}, 8),
               norm_u16_in=d16, norm_u16_out=prd.normalize_data({"diffraction": d16}, 8))

    # get_neighbor_indices (distinct distances, so no ties)
    gx, gy = rng.uniform(0, 30, 15), rng.uniform(0, 30, 15)
    out.update(gni_x=gx, gni_y=gy, gni_out=prd.get_neighbor_indices(gx, gy, K=3))

    # a grouped dict for fixed groups (gridsize 2, objectGuess, no Y)
    n, N = 12, 8
    yy, xx = np.divmod(np.arange(n), 4)
    x = 6.0 + 2.5 * xx + rng.uniform(-0.4, 0.4, n)
    y = 6.0 + 2.5 * yy + rng.uniform(-0.4, 0.4, n)
    xs, ys = x + 0.3, y - 0.2
    diff = rng.random((n, N, N)).astype(np.float32)
    probe = np.ones((N, N), np.complex64)
    groups = np.array([[0, 1, 4, 5], [5, 6, 9, 10], [2, 3, 6, 7], [7, 11, 10, 6]], np.int32)
    params.cfg["gridsize"] = 2
    raw = prd.RawData(x, y, xs, ys, diff, probe, np.zeros(n, int), objectGuess=obj)
    dset = raw._generate_dataset_from_groups(groups, N, 4, 2)
    out.update(grp_x=x, grp_y=y, grp_xs=xs, grp_ys=ys, grp_diff=diff, grp_groups=groups)
    for key, value in dset.items():
        if value is not None and key != "objectGuess":
            out[f"grp_out_{key}"] = np.asarray(value)
    facts["grouped_keys"] = sorted(dset)
    facts["grouped_dtypes"] = {k: str(np.asarray(v).dtype) for k, v in dset.items()
                               if v is not None}

    # what loader.load makes of that dict
    container = loader.load(lambda: dset, probe, which=None, create_split=False)
    facts["loader"] = {name: [list(np.shape(getattr(container, name))),
                              str(getattr(container, name).dtype.name
                                  if hasattr(getattr(container, name).dtype, "name")
                                  else getattr(container, name).dtype)]
                       for name in ("X", "Y_I", "Y_phi", "coords_nominal", "coords_true",
                                    "probe", "nn_indices", "global_offsets", "local_offsets")}
    facts["loader_X_equals_X_full"] = bool(np.array_equal(np.asarray(container.X),
                                                          dset["X_full"]))

    # files PtychoPINN writes
    small = {"xcoords": x[:6], "ycoords": y[:6], "xcoords_start": xs[:6],
             "ycoords_start": ys[:6], "diff3d": diff[:6, :4, :4],
             "probeGuess": np.ones((4, 4), np.complex64), "scan_index": np.zeros(6, int)}
    metadata = {"schema_version": "1.0.0",
                "physics_parameters": {"nphotons": 1e9, "gridsize": 2, "N": 4},
                "data_transformations": []}
    MetadataManager.save_with_metadata(os.path.join(HERE, "ptychopinn_metadata.npz"), small,
                                       metadata)
    facts["metadata"] = metadata
    prd.RawData(small["xcoords"], small["ycoords"], small["xcoords_start"],
                small["ycoords_start"], small["diff3d"], small["probeGuess"],
                small["scan_index"], objectGuess=None).to_file(
        os.path.join(HERE, "ptychopinn_to_file.npz"))
    facts["to_file_members"] = sorted(np.load(os.path.join(HERE, "ptychopinn_to_file.npz"),
                                              allow_pickle=True).files)

    # RawData.from_simulation at gridsize 1 (as ptycho.nongrid_simulation sets params: N =
    # the probe's size, nphotons): one noisy draw (TensorFlow's Poisson sampler, seeded),
    # and its deterministic parts computed with PtychoPINN's own functions the way its
    # diffsim.illuminate_and_diffract chains them: the intensity scale and the noise-free
    # amplitudes (both divided by that scale, as its X is)
    import tensorflow as tf
    from ptycho import diffsim
    from ptycho import tf_helper as hh

    sim_obj = (0.5 + rng.random((40, 40)) * np.exp(1j * rng.random((40, 40)))).astype(
        np.complex64)
    py, px = np.mgrid[-4:4, -4:4] + 0.5
    sim_probe = (np.exp(-(px ** 2 + py ** 2) / 18) * np.exp(0.3j * px)).astype(np.complex64)
    sim_x, sim_y = rng.uniform(10, 30, 6), rng.uniform(10, 30, 6)
    sim_nphotons = 1e4
    params.cfg.update(N=8, gridsize=1, nphotons=sim_nphotons)
    tf.random.set_seed(7)
    sim = prd.RawData.from_simulation(sim_x, sim_y, sim_probe, sim_obj)
    Y_I, Y_phi = tf.math.abs(sim.Y), tf.math.angle(sim.Y)
    probe3 = tf.convert_to_tensor(sim_probe[..., None])
    scale = diffsim.scale_nphotons(Y_I * tf.cast(tf.abs(probe3), Y_I.dtype)[None]).numpy()
    lit = scale * hh.combine_complex(Y_I, Y_phi) * tf.cast(probe3[None], tf.complex64)
    amplitude = diffsim.diffract_obj(lit, draw_poisson=False).numpy() / scale
    out.update(sim_object=sim_obj, sim_probe=sim_probe, sim_x=sim_x, sim_y=sim_y,
               sim_diff3d=np.asarray(sim.diff3d), sim_Y=np.asarray(sim.Y),
               sim_scale=np.asarray(scale), sim_amplitude=amplitude)
    facts["from_simulation"] = {
        "nphotons": sim_nphotons, "tf_seed": 7,
        "norm_Y_I": float(np.asarray(sim.norm_Y_I)),
        "norm_Y_I_type": type(sim.norm_Y_I).__name__,
        "dtypes": {k: str(np.asarray(getattr(sim, k)).dtype)
                   for k in ("diff3d", "Y", "xcoords", "xcoords_start")},
        "shapes": {k: list(np.shape(getattr(sim, k))) for k in ("diff3d", "Y")},
        "xcoords_start_is_xcoords": bool(np.array_equal(sim.xcoords_start, sim.xcoords)),
        "scan_index": None if sim.scan_index is None else list(np.shape(sim.scan_index)),
    }

    np.savez_compressed(os.path.join(HERE, "ptychopinn_kat.npz"), **out)
    with open(os.path.join(HERE, "ptychopinn_kat.json"), "w") as fh:
        json.dump(facts, fh, indent=1, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "unknown")

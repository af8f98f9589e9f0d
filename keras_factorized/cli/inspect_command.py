"""`keras-factorized inspect`: the singular-value spectrum of every weight matrix."""

from __future__ import annotations

import argparse
import os

from keras_factorized.cli import _common
from keras_factorized.cli._common import PROG

NAME = "inspect"


def _energy_levels(text: str) -> list[float]:
    return _common.comma_list(_common.fraction, "numbers in (0, 1] like 0.9,0.95")(text)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from keras_factorized import spectrum

    levels = ",".join(f"{e:g}" for e in spectrum.ENERGY_LEVELS)
    percents = "/".join(f"{e:.0%}" for e in spectrum.ENERGY_LEVELS)
    p = _common.add_command(
        subparsers,
        NAME,
        help="singular-value spectra of every factorizable or factorized layer",
        description=_common.wrap(
            "Prints one row per layer that `compress` could factorize "
            f"({spectrum.describe_factorizable()}) and per already-factorized "
            "layer: its matrix shape, the parameters of that matrix, the bytes "
            "the layer stores (all its variables, each at its dtype: an int8 "
            "entry is 1 byte, a float32 one 4), and the ranks that keep "
            f"{percents} of the spectral energy (sum of squared singular "
            "values), each with the parameter saving of factors of that rank "
            "against what the layer stores now (negative: the factors would be "
            "bigger). Layers that `compress` would skip are listed with its "
            "reason. EinsumDense kernels are matricized as input axes x output "
            "axes; factorized layers are analysed through the product of their "
            "factors. The total line counts layers where factors do not pay, and "
            "layers `compress` keeps, as kept whole."
        ),
        epilog=f"Example:\n  {PROG} inspect model.keras --plot spectra.png --json spectra.json",
    )
    p.add_argument("model", metavar="MODEL.keras", help="the saved Keras model")
    p.add_argument(
        "--plot", metavar="PNG", default=None,
        help="write the normalised singular-value spectra and cumulative energy curves to this PNG",
    )
    p.add_argument(
        "--json", metavar="FILE", default=None,
        help="write the table (with the full singular values) as JSON",
    )
    p.add_argument(
        "--energy-levels", type=_energy_levels, default=levels,
        metavar="E1,E2,...", help="the energy fractions reported",
    )
    return p


def run(args) -> int:
    for path in (args.plot, args.json):
        if path:
            _common.check_output_file(path)
    model = _common.load_model(args.model)
    from keras_factorized import reporting
    from keras_factorized import spectrum

    bar = _common.progbar(len(spectrum.model_layers(model)), args.quiet, unit_name="layer")
    rows = spectrum.inspect_model(
        model,
        energies=args.energy_levels,
        progress=lambda done, total, path: bar.update(done),
    )
    print(
        f"Model: {args.model} ({model.count_params():,} parameters, "
        f"{spectrum.stored_bytes(model):,} bytes)"
    )
    print(spectrum.format_table(rows))
    if args.json:
        reporting.write_json(args.json, spectrum.to_jsonable(rows))
        print(f"Wrote {args.json}")
    if args.plot:
        spectrum.plot_spectra(rows, args.plot, title=os.path.basename(args.model))
        print(f"Wrote {args.plot}")
    return 0

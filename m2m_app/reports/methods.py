"""The references behind the methods boilerplate, as HTML and as a BibTeX file."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from m2m_app.io.files import atomic_write

#: BibTeX key → (short citation shown in the report, BibTeX entry).
REFERENCES: dict[str, tuple[str, str]] = {
    "basser1994": (
        "Basser PJ, Mattiello J, LeBihan D. MR diffusion tensor spectroscopy and imaging. "
        "Biophys J. 1994;66(1):259-267.",
        "@article{basser1994,\n  author = {Basser, P. J. and Mattiello, J. and LeBihan, D.},\n"
        "  title = {{MR} diffusion tensor spectroscopy and imaging},\n  journal = {Biophysical Journal},\n"
        "  year = {1994}, volume = {66}, number = {1}, pages = {259--267},\n"
        "  doi = {10.1016/S0006-3495(94)80775-1}\n}",
    ),
    "pajevic1999": (
        "Pajevic S, Pierpaoli C. Color schemes to represent the orientation of anisotropic tissues from "
        "diffusion tensor data. Magn Reson Med. 1999;42(3):526-540.",
        "@article{pajevic1999,\n  author = {Pajevic, S. and Pierpaoli, C.},\n"
        "  title = {Color schemes to represent the orientation of anisotropic tissues from diffusion tensor "
        "data: application to white matter fiber tract mapping in the human brain},\n"
        "  journal = {Magnetic Resonance in Medicine},\n  year = {1999}, volume = {42}, number = {3},"
        " pages = {526--540}\n}",
    ),
    "arsigny2006": (
        "Arsigny V, Fillard P, Pennec X, Ayache N. Log-Euclidean metrics for fast and simple calculus on "
        "diffusion tensors. Magn Reson Med. 2006;56(2):411-421.",
        "@article{arsigny2006,\n  author = {Arsigny, V. and Fillard, P. and Pennec, X. and Ayache, N.},\n"
        "  title = {Log-{E}uclidean metrics for fast and simple calculus on diffusion tensors},\n"
        "  journal = {Magnetic Resonance in Medicine},\n  year = {2006}, volume = {56}, number = {2},"
        " pages = {411--421},\n  doi = {10.1002/mrm.20965}\n}",
    ),
    "ronneberger2015": (
        "Ronneberger O, Fischer P, Brox T. U-Net: convolutional networks for biomedical image segmentation. "
        "MICCAI 2015, LNCS 9351:234-241.",
        "@inproceedings{ronneberger2015,\n  author = {Ronneberger, O. and Fischer, P. and Brox, T.},\n"
        "  title = {{U-Net}: convolutional networks for biomedical image segmentation},\n"
        "  booktitle = {Medical Image Computing and Computer-Assisted Intervention (MICCAI)},\n"
        "  series = {LNCS}, volume = {9351}, pages = {234--241}, year = {2015}\n}",
    ),
    "isola2017": (
        "Isola P, Zhu JY, Zhou T, Efros AA. Image-to-image translation with conditional adversarial "
        "networks. CVPR 2017:1125-1134.",
        "@inproceedings{isola2017,\n  author = {Isola, P. and Zhu, J.-Y. and Zhou, T. and Efros, A. A.},\n"
        "  title = {Image-to-image translation with conditional adversarial networks},\n"
        "  booktitle = {IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},\n"
        "  pages = {1125--1134}, year = {2017}\n}",
    ),
    "mildenhall2020": (
        "Mildenhall B, Srinivasan PP, Tancik M, Barron JT, Ramamoorthi R, Ng R. NeRF: representing scenes "
        "as neural radiance fields for view synthesis. ECCV 2020.",
        "@inproceedings{mildenhall2020,\n  author = {Mildenhall, B. and Srinivasan, P. P. and Tancik, M. and "
        "Barron, J. T. and Ramamoorthi, R. and Ng, R.},\n"
        "  title = {{NeRF}: representing scenes as neural radiance fields for view synthesis},\n"
        "  booktitle = {European Conference on Computer Vision (ECCV)}, year = {2020}\n}",
    ),
    "basser2000": (
        "Basser PJ, Pajevic S, Pierpaoli C, Duda J, Aldroubi A. In vivo fiber tractography using DT-MRI "
        "data. Magn Reson Med. 2000;44(4):625-632.",
        "@article{basser2000,\n  author = {Basser, P. J. and Pajevic, S. and Pierpaoli, C. and Duda, J. and "
        "Aldroubi, A.},\n  title = {In vivo fiber tractography using {DT-MRI} data},\n"
        "  journal = {Magnetic Resonance in Medicine},\n  year = {2000}, volume = {44}, number = {4},"
        " pages = {625--632}\n}",
    ),
    "gorgolewski2011": (
        "Gorgolewski K, Burns CD, Madison C, et al. Nipype: a flexible, lightweight and extensible "
        "neuroimaging data processing framework in Python. Front Neuroinform. 2011;5:13.",
        "@article{gorgolewski2011,\n  author = {Gorgolewski, K. and Burns, C. D. and Madison, C. and others},\n"
        "  title = {Nipype: a flexible, lightweight and extensible neuroimaging data processing framework in "
        "{Python}},\n  journal = {Frontiers in Neuroinformatics},\n  year = {2011}, volume = {5}, pages = {13},\n"
        "  doi = {10.3389/fninf.2011.00013}\n}",
    ),
    "garyfallidis2014": (
        "Garyfallidis E, Brett M, Amirbekian B, et al. Dipy, a library for the analysis of diffusion MRI "
        "data. Front Neuroinform. 2014;8:8.",
        "@article{garyfallidis2014,\n  author = {Garyfallidis, E. and Brett, M. and Amirbekian, B. and others},\n"
        "  title = {Dipy, a library for the analysis of diffusion {MRI} data},\n"
        "  journal = {Frontiers in Neuroinformatics},\n  year = {2014}, volume = {8}, pages = {8},\n"
        "  doi = {10.3389/fninf.2014.00008}\n}",
    ),
    "gorgolewski2016": (
        "Gorgolewski KJ, Auer T, Calhoun VD, et al. The brain imaging data structure, a format for "
        "organizing and describing outputs of neuroimaging experiments. Sci Data. 2016;3:160044.",
        "@article{gorgolewski2016,\n  author = {Gorgolewski, K. J. and Auer, T. and Calhoun, V. D. and others},\n"
        "  title = {The brain imaging data structure, a format for organizing and describing outputs of "
        "neuroimaging experiments},\n  journal = {Scientific Data},\n  year = {2016}, volume = {3},"
        " pages = {160044},\n  doi = {10.1038/sdata.2016.44}\n}",
    ),
    "fisch2024": (
        "Fisch L, Zumdick S, Barkhau C, et al. deepbet: fast brain extraction of T1-weighted MRI using "
        "convolutional neural networks. Comput Biol Med. 2024;179:108845.",
        "@article{fisch2024,\n  author = {Fisch, L. and Zumdick, S. and Barkhau, C. and others},\n"
        "  title = {deepbet: fast brain extraction of {T1}-weighted {MRI} using convolutional neural networks},\n"
        "  journal = {Computers in Biology and Medicine},\n  year = {2024}, volume = {179}, pages = {108845},\n"
        "  doi = {10.1016/j.compbiomed.2024.108845}\n}",
    ),
    "avants2011": (
        "Avants BB, Tustison NJ, Wu J, Cook PA, Gee JC. An open source multivariate framework for n-tissue "
        "segmentation with evaluation on public data. Neuroinformatics. 2011;9(4):381-400.",
        "@article{avants2011,\n  author = {Avants, B. B. and Tustison, N. J. and Wu, J. and Cook, P. A. and "
        "Gee, J. C.},\n  title = {An open source multivariate framework for n-tissue segmentation with "
        "evaluation on public data},\n  journal = {Neuroinformatics},\n  year = {2011}, volume = {9},"
        " number = {4}, pages = {381--400},\n  doi = {10.1007/s12021-011-9109-y}\n}",
    ),
    "tustison2010": (
        "Tustison NJ, Avants BB, Cook PA, et al. N4ITK: improved N3 bias correction. IEEE Trans Med Imaging. "
        "2010;29(6):1310-1320.",
        "@article{tustison2010,\n  author = {Tustison, N. J. and Avants, B. B. and Cook, P. A. and others},\n"
        "  title = {{N4ITK}: improved {N3} bias correction},\n  journal = {IEEE Transactions on Medical Imaging},\n"
        "  year = {2010}, volume = {29}, number = {6}, pages = {1310--1320},\n"
        "  doi = {10.1109/TMI.2010.2046908}\n}",
    ),
    "avants2008": (
        "Avants BB, Epstein CL, Grossman M, Gee JC. Symmetric diffeomorphic image registration with "
        "cross-correlation. Med Image Anal. 2008;12(1):26-41.",
        "@article{avants2008,\n  author = {Avants, B. B. and Epstein, C. L. and Grossman, M. and Gee, J. C.},\n"
        "  title = {Symmetric diffeomorphic image registration with cross-correlation: evaluating automated "
        "labeling of elderly and neurodegenerative brain},\n  journal = {Medical Image Analysis},\n"
        "  year = {2008}, volume = {12}, number = {1}, pages = {26--41},\n"
        "  doi = {10.1016/j.media.2007.06.004}\n}",
    ),
    "fonov2011": (
        "Fonov V, Evans AC, Botteron K, et al. Unbiased average age-appropriate atlases for pediatric studies. "
        "NeuroImage. 2011;54(1):313-327.",
        "@article{fonov2011,\n  author = {Fonov, V. and Evans, A. C. and Botteron, K. and others},\n"
        "  title = {Unbiased average age-appropriate atlases for pediatric studies},\n  journal = {NeuroImage},\n"
        "  year = {2011}, volume = {54}, number = {1}, pages = {313--327},\n"
        "  doi = {10.1016/j.neuroimage.2010.07.033}\n}",
    ),
    "desikan2006": (
        "Desikan RS, Ségonne F, Fischl B, et al. An automated labeling system for subdividing the human cerebral "
        "cortex on MRI scans into gyral based regions of interest. NeuroImage. 2006;31(3):968-980.",
        "@article{desikan2006,\n  author = {Desikan, R. S. and S{\\'e}gonne, F. and Fischl, B. and others},\n"
        "  title = {An automated labeling system for subdividing the human cerebral cortex on {MRI} scans into "
        "gyral based regions of interest},\n  journal = {NeuroImage},\n"
        "  year = {2006}, volume = {31}, number = {3}, pages = {968--980},\n"
        "  doi = {10.1016/j.neuroimage.2006.01.021}\n}",
    ),
    "markello2021": (
        "Markello RD, Arnatkeviciute A, Poline JB, Fulcher BD, Fornito A, Misic B. Standardizing workflows in "
        "imaging transcriptomics with the abagen toolbox. eLife. 2021;10:e72129.",
        "@article{markello2021,\n  author = {Markello, R. D. and Arnatkeviciute, A. and Poline, J.-B. and "
        "Fulcher, B. D. and Fornito, A. and Misic, B.},\n  title = {Standardizing workflows in imaging "
        "transcriptomics with the abagen toolbox},\n  journal = {eLife},\n  year = {2021}, volume = {10},"
        " pages = {e72129},\n  doi = {10.7554/eLife.72129}\n}",
    ),
    "cieslak2021": (
        "Cieslak M, Cook PA, He X, et al. QSIPrep: an integrative platform for preprocessing and reconstructing "
        "diffusion MRI data. Nat Methods. 2021;18(7):775-778.",
        "@article{cieslak2021,\n  author = {Cieslak, M. and Cook, P. A. and He, X. and others},\n"
        "  title = {{QSIPrep}: an integrative platform for preprocessing and reconstructing diffusion {MRI} data},\n"
        "  journal = {Nature Methods},\n  year = {2021}, volume = {18}, number = {7}, pages = {775--778},\n"
        "  doi = {10.1038/s41592-021-01185-5}\n}",
    ),
}

#: The references of each part of the pipeline.
PHASE1_REFERENCES = ("basser1994", "pajevic1999", "arsigny2006", "ronneberger2015", "isola2017")
NERF_REFERENCES = ("mildenhall2020", "basser2000")
TOOL_REFERENCES = ("gorgolewski2011", "garyfallidis2014", "gorgolewski2016")
#: Of the registration to a template (``--output-spaces``, ``--atlases``), and of the atlas.
TEMPLATE_REFERENCES = ("avants2008", "fonov2011")
ATLAS_REFERENCES = ("desikan2006", "markello2021")
#: The references of the teacher's methods text (``m2m-train prepare``) before the atlas's, in the order
#: it cites them, by where its DWI comes from (:data:`m2m_app.teacher.prepare.DWI_SOURCES`): the raw DWI,
#: registered by m2m (ANTs' check cited), or QSIPrep's preprocessed DWI (QSIPrep cited, no registration).
_TEACHER_UNTIL_ATLAS = {
    "raw": ("fisch2024", "avants2011", "tustison2010", "garyfallidis2014", "avants2008"),
    "qsiprep": ("fisch2024", "avants2011", "tustison2010", "cieslak2021", "garyfallidis2014"),
}


def teacher_cited(dwi_source: str, with_atlas: bool = True) -> list[str]:
    """The BibTeX keys of ``m2m-train prepare``'s methods text: with an atlas (``--atlases``) the
    T1w's registration to the template (ANTs, the template) and the atlas are cited too."""
    atlas = (*TEMPLATE_REFERENCES, *ATLAS_REFERENCES) if with_atlas else ()
    return list(dict.fromkeys((*_TEACHER_UNTIL_ATLAS[dwi_source], *atlas, "gorgolewski2011", "gorgolewski2016")))


#: The distributions the teacher runs on, cited with their installed versions.
TEACHER_SOFTWARE = ("m2m-app", "deepbet", "antspyx", "dipy", "nipype", "nibabel", "torch")


def cited(with_nerf: bool, with_template: bool = False, with_atlas: bool = False) -> list[str]:
    """The BibTeX keys of a run (the NeRF's references only when phase 3 ran, the registration's
    when a template space or an atlas was asked for, the atlas's with an atlas)."""
    return [
        *PHASE1_REFERENCES,
        *(NERF_REFERENCES if with_nerf else ()),
        *(TEMPLATE_REFERENCES if with_template or with_atlas else ()),
        *(ATLAS_REFERENCES if with_atlas else ()),
        *TOOL_REFERENCES,
    ]


def references_html(keys: list[str]) -> str:
    """An ordered list of the references, each item's id ``ref-<key>``."""
    return (
        '<ol class="references">'
        + "".join(f'<li id="ref-{key}">{html.escape(REFERENCES[key][0])}</li>' for key in keys)
        + "</ol>"
    )


def software_bibtex(distribution: str) -> str:
    """A ``@software`` BibTeX entry for an installed distribution, with its version (``unknown`` if not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version(distribution)
    except PackageNotFoundError:
        installed = "unknown"
    key = "".join(c for c in distribution if c.isalnum())
    return (
        f"@software{{{key},\n  title = {{{distribution}}},\n  version = {{{installed}}},\n"
        f"  url = {{https://pypi.org/project/{distribution}/{installed}/}}\n}}"
    )


def write_bibtex(path: Path, keys: Sequence[str], software: Sequence[str] = ()) -> Path:
    """Write the BibTeX entries of ``keys``, then one ``@software`` entry (with its installed
    version) per distribution in ``software``, to ``path`` (atomically)."""
    entries = [REFERENCES[key][1] for key in keys] + [software_bibtex(name) for name in software]
    text = "\n\n".join(entries) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))

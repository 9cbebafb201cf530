"""Diagnosis text (T3): a small grammar tied to the fine label, with synonyms and word order."""

from __future__ import annotations


import numpy as np

from eye_fundus.synthetic.catalogue import FineClass

_EYE_PHRASES = {
    "right": ("right eye", "of the right eye", "in the right eye", "od", "right side", "oculus dexter"),
    "left": ("left eye", "of the left eye", "in the left eye", "os", "left side", "oculus sinister"),
}
_NORMAL_FINDING = {
    "healthy fundus": ("normal fundus", "healthy fundus", "normal retina", "unremarkable fundus examination",
                       "no retinopathy seen", "normal optic disc and macula", "no abnormality detected"),
    "tessellated fundus": ("tessellated fundus", "tigroid fundus", "myopic tessellation",
                           "visible choroidal vessels"),
    "tilted optic disc": ("tilted optic disc", "tilted disc", "oblique optic disc insertion"),
    "peripapillary crescent": ("peripapillary crescent", "temporal myopic crescent",
                               "scleral crescent at disc margin"),
    "large physiological cup": ("large physiological cup", "physiologic cupping",
                                "large symmetric optic cup", "enlarged cup with healthy rim"),
}
_NORMAL_PIGMENT = {"light pigmentation": ("lightly pigmented", "blond fundus"),
                   "dark pigmentation": ("darkly pigmented", "heavily pigmented fundus")}
_NORMAL_EXTRA = ("otherwise normal", "no diabetic retinopathy", "routine screening",
                 "follow up in one year", "benign variant")
_DR_SEVERITY = {
    "mild nonproliferative": ("mild nonproliferative", "mild non proliferative", "early background",
                              "minimal nonproliferative"),
    "moderate nonproliferative": ("moderate nonproliferative", "moderate non proliferative",
                                  "moderate background"),
    "severe nonproliferative": ("severe nonproliferative", "severe non proliferative", "preproliferative",
                                "very severe nonproliferative"),
    "proliferative": ("proliferative", "active proliferative", "high risk proliferative"),
}
_DR_ABBREVIATION = {"mild nonproliferative": "mild npdr", "moderate nonproliferative": "moderate npdr",
                    "severe nonproliferative": "severe npdr", "proliferative": "pdr"}
_DR_SIGNS = {
    "mild nonproliferative": ("scattered microaneurysms", "few microaneurysms"),
    "moderate nonproliferative": ("dot blot hemorrhages and hard exudates", "scattered intraretinal hemorrhages"),
    "severe nonproliferative": ("hemorrhages in four quadrants", "multiple cotton wool spots"),
    "proliferative": ("with neovascularization", "new vessels present", "fibrovascular proliferation"),
}
_DIABETES = ("type 2 diabetes mellitus with", "type 1 diabetes mellitus with", "diabetes mellitus type 2 with",
             "insulin dependent diabetic with")
_DR_EDEMA = {
    "with macular edema": ("with macular edema", "with diabetic macular edema",
                           "with clinically significant macular edema", "with center involving macular edema",
                           "and maculopathy"),
    "without macular edema": ("without macular edema", "without macular involvement", "no macular edema",
                              "macula dry"),
}
_DR_QUADRANT = ("predominantly {q}", "mainly in the {q} retina", "{q} quadrant involvement")
_DR_LASER = ("status post panretinal photocoagulation", "with laser scars", "after prp laser",
             "treated with scatter laser photocoagulation")
_AMD_NAMES = ("age related macular degeneration", "senile macular degeneration", "macular degeneration",
              "degeneration of macula", "armd")
_AMD_STAGE = {  # (adjectives before the name, phrases after it)
    "early dry": (("early nonexudative", "early dry", "mild nonexudative"),
                  ("with small drusen", "with few hard drusen", "early stage")),
    "intermediate dry": (("intermediate nonexudative", "intermediate dry", "nonexudative"),
                         ("with large soft drusen", "with confluent drusen", "intermediate stage")),
    "geographic atrophy": (("advanced dry", "atrophic", "advanced nonexudative"),
                           ("with geographic atrophy", "with central atrophy", "advanced atrophic stage")),
    "wet active": (("exudative", "wet", "neovascular"),
                   ("with active choroidal neovascularization", "with subretinal hemorrhage",
                    "with active cnv and fluid")),
    "disciform scar": (("end stage exudative", "inactive wet", "advanced exudative"),
                       ("with disciform scar", "with fibrovascular scar", "with subretinal fibrosis")),
}
_AMD_LOCATION = {None: ("subfoveal", "involving the fovea", "center involving"),
                 "extrafoveal": ("extrafoveal", "sparing the fovea", "juxtafoveal lesion")}
_AMD_PIGMENT = ("with pigmentary changes", "with pigment clumping", "with retinal pigment epithelium changes",
                "with hyperpigmentation")
_GLAUCOMA_SUSPECT = ("glaucoma suspect", "suspected glaucoma", "suspicious cupping of optic disc",
                     "open angle glaucoma suspect", "preperimetric glaucoma")
_GLAUCOMA_NAMES = ("primary open angle glaucoma", "open angle glaucoma", "chronic open angle glaucoma",
                   "poag", "chronic glaucoma")
_GLAUCOMA_STAGE = {"mild": ("mild stage", "early stage", "mild"), "moderate": ("moderate stage", "moderate"),
                   "severe": ("severe stage", "advanced stage", "severe")}
_GLAUCOMA_STAGE_ADJ = {"mild": ("mild", "early"), "moderate": ("moderate",), "severe": ("severe", "advanced")}
_GLAUCOMA_CDR_WORDS = {"suspect": "point six", "mild": "point seven", "moderate": "point eight",
                       "severe": "point nine"}
_CDR_PHRASES = ("cup to disc ratio {r}", "vertical cup disc ratio {r}", "cd ratio {r}")
_GLAUCOMA_RIM = {
    "inferior": ("inferior rim thinning", "inferior notching of the rim", "thin inferior neuroretinal rim"),
    "superior": ("superior rim thinning", "superior notching of the rim", "thin superior neuroretinal rim"),
    "temporal": ("temporal rim thinning", "temporal rim loss", "thin temporal neuroretinal rim"),
    "diffuse": ("diffuse rim loss", "concentric cupping", "generalized rim thinning"),
}
_GLAUCOMA_ATROPHY = ("with peripapillary atrophy", "with beta zone peripapillary atrophy",
                     "peripapillary atrophy present")
_MELANOMA_CHOROID = ("choroidal malignant melanoma", "malignant melanoma of the choroid", "melanoma of choroid",
                     "uveal melanoma", "choroidal malignant melanoma of the uvea", "malignant melanoma of uvea")
_MELANOMA_CILIARY = ("malignant melanoma of ciliary body", "ciliary body melanoma",
                     "melanoma of the ciliary body", "ciliochoroidal melanoma")
_MELANOMA_SIZE = {"small": ("small lesion", "small pigmented lesion", "small tumor"),
                  "medium": ("medium sized tumor", "medium size lesion", "moderately elevated mass"),
                  "large": ("large tumor", "large dome shaped mass", "large mushroom shaped tumor")}
_MELANOMA_COMPASS = {"superior temporal": "superotemporal", "inferior temporal": "inferotemporal",
                     "superior nasal": "superonasal", "inferior nasal": "inferonasal"}
_MELANOMA_FLUID = ("with subretinal fluid", "with overlying orange pigment and subretinal fluid",
                   "with exudative retinal detachment", "with serous detachment")
_MAX_WORDS, _MIN_WORDS = 14, 4


def diagnosis_text(fine: FineClass, rng: np.random.Generator) -> str:
    """An ophthalmologist-style diagnosis (T3) for a fine class.

    The grammar picks synonyms, optional qualifiers and word order, so the sentence is
    tied to the fine label without being a function of it.  Lower case words separated by
    single spaces, 4-14 words.
    """
    a = fine.get
    # A caption is a list of slots, each a tuple of interchangeable phrases.
    if fine.broad == "normal":
        slots = [_NORMAL_FINDING[a("finding")]]
        if a("pigmentation"):
            slots.insert(int(rng.integers(2)), _NORMAL_PIGMENT[a("pigmentation")])
        optional = [_NORMAL_EXTRA] if rng.random() < 0.4 else []
    elif fine.broad == "DR":
        sev, form = a("severity"), rng.random()
        if form < 0.55:
            slots = [tuple(f"{s} diabetic retinopathy" for s in _DR_SEVERITY[sev])]
        elif form < 0.8:
            slots = [tuple(f"diabetic retinopathy {s} stage" for s in _DR_SEVERITY[sev])]
        else:
            slots = [(_DR_ABBREVIATION[sev],)]
        if rng.random() < 0.35:
            slots.insert(0, _DIABETES)
        if a("edema") == "with macular edema" or rng.random() < 0.7:
            slots.append(_DR_EDEMA[a("edema")])
        if a("quadrant"):
            slots.append(tuple(t.format(q=a("quadrant").split()[0]) for t in _DR_QUADRANT))
        if a("laser"):
            slots.append(_DR_LASER)
        optional = [_DR_SIGNS[sev]] if rng.random() < 0.3 else []
    elif fine.broad == "AMD":
        adjectives, posts = _AMD_STAGE[a("stage")]
        name = _pick(rng, _AMD_NAMES)
        if rng.random() < 0.5:
            slots = [tuple(f"{adj} {name}" for adj in adjectives)]
            if rng.random() < 0.4:
                slots.append(posts)
        else:
            slots = [(name,), posts]
        if a("location"):
            slots.append(_AMD_LOCATION[a("location")])
        if a("pigment"):
            slots.append(_AMD_PIGMENT)
        optional = [_AMD_LOCATION[None]] if not a("location") and rng.random() < 0.4 else []
    elif fine.broad == "glaucoma":
        sev = a("severity")
        if sev == "suspect":
            slots = [_GLAUCOMA_SUSPECT]
        elif rng.random() < 0.6:
            slots = [_GLAUCOMA_NAMES, _GLAUCOMA_STAGE[sev]]
        else:
            slots = [tuple(f"{adj} {n}" for adj in _GLAUCOMA_STAGE_ADJ[sev] for n in _GLAUCOMA_NAMES)]
        if rng.random() < 0.6:
            slots.append(_GLAUCOMA_RIM[a("rim").split()[0]])
        if a("atrophy"):
            slots.append(_GLAUCOMA_ATROPHY)
        cdr = tuple(t.format(r=_GLAUCOMA_CDR_WORDS[sev]) for t in _CDR_PHRASES)
        optional = [cdr] if rng.random() < 0.35 else []
    else:  # melanoma
        quadrant = a("quadrant").replace(" quadrant", "")
        compass = _MELANOMA_COMPASS[quadrant]
        slots = [_MELANOMA_CILIARY if a("site") == "ciliary body" else _MELANOMA_CHOROID,
                 (f"{quadrant} quadrant", f"in the {quadrant} quadrant", compass, f"{compass} lesion")]
        if rng.random() < 0.4:
            slots.reverse()
        if rng.random() < 0.6:
            slots.append(_MELANOMA_SIZE[a("size")])
        if a("fluid"):
            slots.append(_MELANOMA_FLUID)
        optional = [("with orange lipofuscin pigment",)] if rng.random() < 0.25 else []
    eye = _EYE_PHRASES[fine.eye]
    slots.insert(0 if rng.random() < 0.2 else len(slots), eye)
    chosen = [_pick(rng, slot) for slot in slots]

    def n_words(phrases):
        return sum(len(p.split()) for p in phrases)

    # Over the length budget: drop the diabetes preamble, then use the shortest synonyms.
    if n_words(chosen) > _MAX_WORDS and _DIABETES in slots:
        i = slots.index(_DIABETES)
        del slots[i], chosen[i]
    for i in np.argsort([-len(c.split()) for c in chosen], kind="stable"):
        if n_words(chosen) <= _MAX_WORDS:
            break
        chosen[i] = min(slots[i], key=lambda p: len(p.split()))
    for slot in optional:  # optional qualifiers only where the length budget allows
        extra = _pick(rng, slot)
        if n_words(chosen) + len(extra.split()) <= _MAX_WORDS:
            # Before a trailing eye phrase ("... with small drusen left eye").
            chosen.insert(len(chosen) - 1 if slots[-1] is eye else len(chosen), extra)
    words = " ".join(chosen).split()
    if len(words) < _MIN_WORDS:
        words += ["on", "fundus", "examination"]
    return " ".join(words[:_MAX_WORDS])


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]

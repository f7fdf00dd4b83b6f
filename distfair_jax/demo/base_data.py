"""The biased base model's data: every occupation's answers skewed to one category."""

from __future__ import annotations

import numpy as np

from distfair_jax.data import build as build_lib
from distfair_jax.data import templates as templates_lib



_SECTOR_STEREOTYPE = {  # race / sentiment category index per sector (synthetic stereotypes)
    "race": {"Technology & Engineering": 3, "Healthcare & Medicine": 1},
    "sentiment": {"Healthcare & Medicine": 1, "Technology & Engineering": 0,
                  "Education & Research": 0, "Finance & Business": 2,
                  "Manufacturing & Construction": 1},
}


def stereotype(spec, occupation: str, share: float) -> np.ndarray:
  """The base model's skewed answer distribution [K] for ``occupation``: ``share`` on the stereotyped
  category (gender: the occupation's majority sex by the real figures; race / sentiment: a fixed
  category per sector; a user's own attribute: the category its target gives the most, the first on
  a tie, exaggerated as the gender stereotype exaggerates the majority), the rest spread evenly."""
  attr = spec.attribute
  k = attr.num_categories
  if (attr.name == "gender" and spec.table is not None and occupation in spec.table.names and
      spec.table.get(occupation).male is not None):
    major = int(np.argmax(spec.table.real_gender_target(occupation)))
  elif attr.name not in _SECTOR_STEREOTYPE:
    major = int(np.argmax(spec.target(occupation)))
  else:
    sector = spec.table.get(occupation).sector if spec.table is not None else ""
    major = _SECTOR_STEREOTYPE.get(attr.name, {}).get(sector, 0)
  p = np.full((k,), (1.0 - share) / max(k - 1, 1))
  p[major] = share if k > 1 else 1.0
  return p / p.sum()


def stereotyped_records(spec, *, rows_per_occupation: int, stories_per_occupation: int, share: float,
                        seed: int) -> list[dict]:
  """IFT-style records (prompt, occupation, category, response, target) of the stereotyped base data."""
  attr, tpl = spec.attribute, spec.templates
  rng = np.random.default_rng(seed)
  wordings = list(tpl.train) + list(tpl.v1) + [tpl.v2]
  story_wordings = list(tpl.train_story) + [tpl.v3]
  out = []
  for occupation in spec.occupations:
    s = stereotype(spec, occupation, share)
    render = lambda t: templates_lib.render(t, occupation=occupation, region=spec.region, attribute=attr)
    for n, group, story in ((rows_per_occupation, wordings, False),
                            (stories_per_occupation, story_wordings, True)):
      cats = np.repeat(np.arange(attr.num_categories), build_lib.allocate(s, n))[rng.permutation(n)]
      for r, k in enumerate(cats.tolist()):
        response = (templates_lib.make_story(attr, k, occupation, rng) if story
                    else attr.categories[k].answer)
        out.append({"prompt": render(group[r % len(group)]), "occupation": occupation, "category": k,
                    "response": response, "target": [float(x) for x in s]})
  return out

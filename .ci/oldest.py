"""Print `name==floor` for each of prcl's requirements and its test extra: the oldest versions
pyproject.toml allows, for .ci/run's compatibility step. A requirement without a `>=` floor is an error."""
import re
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", req)
    if m is None:
        sys.exit(f"pyproject.toml: requirement {req!r} has no >= floor to test")
    print(f"{m[1]}=={m[2]}")

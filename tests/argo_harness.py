"""A stand-in for Argo's workflow controller, for tests only: runs a rendered WorkflowTemplate here.

No Argo can run on this machine, so this walks the template's DAG the way the controller does and
runs each task's container command as a process of the project venv (``LocalPods``) or in its image
with Docker (``DockerPods``):

- a workflow from the template: ``workflow.name``/``uid``, its parameters (the template's defaults,
  overridden by the submitted ones, enums enforced);
- the entrypoint DAG: a task runs once every task of its ``depends`` (``a && b``) succeeded or was
  skipped; its ``when`` (after substitution, govaluate's ``'x' == 'y'``) decides whether it runs;
  its arguments are resolved against the workflow and its ancestors' outputs, then bound to the
  template's inputs;
- substitution of ``{{simple.tags}}`` and ``{{=expressions}}`` (a subset of expr-lang: literals,
  member and index access, calls, arithmetic, comparisons, ``&&``/``||``/``!``, ``?:``, lists; the
  functions Argo provides: ``jsonpath``, ``toJson``, ``fromJSON``, ``concat``, ``asInt``, ``asFloat``,
  ``string``, ``sprig.sha256sum``), results inserted as Argo does (strings raw, anything else JSON);
- a container: its env (values, and ``secretKeyRef`` from the secrets given, optional keys
  skippable), its ``emptyDir`` volumes as fresh folders per attempt (a pod's), its working folder,
  its ``podSpecPatch`` checked to be JSON after substitution, its output parameters read from their
  files;
- ``retryStrategy``: further attempts while the ``expression`` (``lastRetry.status``/``exitCode``)
  allows, up to ``limit`` (no backoff waits);
- ``memoize``: the key (checked against Argo's cache-key pattern) looked up in a ConfigMap-like dict
  that outlives the run; a hit skips the container and takes the cached outputs;
- ``onExit``: runs after the DAG with ``workflow.status`` (Succeeded/Failed) and
  ``workflow.failures`` (the failed nodes as JSON, as Argo gives them).

What it does not do: scheduling, resources, node placement, service accounts, log archiving.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE_KEY = re.compile(r"^[a-zA-Z0-9][-a-zA-Z0-9]*$")  # Argo's workflow/controller/cache/cache.go


class HarnessError(Exception):
    """The template uses something this harness (or Argo) cannot resolve."""


# ---------------------------------------------------------------- expr-lang (the subset Argo uses here)

_TOKEN = re.compile(r"""\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")|"""
                    r"""(?P<name>[A-Za-z_$][A-Za-z0-9_]*)|(?P<op>==|!=|<=|>=|&&|\|\||[-+*/%<>!?:.,()\[\]]))""")


def _tokens(text: str) -> list[tuple[str, Any]]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise HarnessError(f"cannot read expression {text!r} at {text[pos:pos + 20]!r}")
        pos = match.end()
        kind = match.lastgroup
        value = match.group(kind)
        if kind == "num":
            tokens.append(("num", float(value) if "." in value else int(value)))
        elif kind == "str":
            tokens.append(("str", json.loads('"' + value[1:-1].replace('"', '\\"').replace("\\'", "'") + '"')
                           if value[0] == "'" else json.loads(value)))
        else:
            tokens.append((kind, value))
    return tokens


class _Parser:
    """Recursive descent over the tokens; each rule returns a function of the environment, so ``?:``,
    ``&&`` and ``||`` evaluate only the side they need (as expr does)."""

    def __init__(self, text: str):
        self.text, self.tokens, self.i = text, _tokens(text), 0

    def peek(self, *values: str) -> bool:
        return self.i < len(self.tokens) and self.tokens[self.i][1] in values and self.tokens[self.i][0] in (
            "op", "name")

    def take(self, value: str) -> None:
        if not self.peek(value):
            raise HarnessError(f"expected {value!r} in expression {self.text!r}")
        self.i += 1

    def parse(self) -> Callable[[Mapping], Any]:
        node = self.ternary()
        if self.i != len(self.tokens):
            raise HarnessError(f"unexpected {self.tokens[self.i][1]!r} in expression {self.text!r}")
        return node

    def ternary(self):
        condition = self.binary(0)
        if not self.peek("?"):
            return condition
        self.take("?")
        yes = self.ternary()
        self.take(":")
        no = self.ternary()
        return lambda env: yes(env) if _truth(condition(env)) else no(env)

    # Binary operators by precedence, loosest first (expr-lang's). ``&&``/``||`` take functions of the
    # environment, so the right side is evaluated only when needed.
    LEVELS = (
        {"||": lambda a, b, env: _truth(a(env)) or _truth(b(env)),
         "or": lambda a, b, env: _truth(a(env)) or _truth(b(env))},
        {"&&": lambda a, b, env: _truth(a(env)) and _truth(b(env)),
         "and": lambda a, b, env: _truth(a(env)) and _truth(b(env))},
        {"==": lambda a, b, env: a(env) == b(env), "!=": lambda a, b, env: a(env) != b(env),
         "<": lambda a, b, env: a(env) < b(env), ">": lambda a, b, env: a(env) > b(env),
         "<=": lambda a, b, env: a(env) <= b(env), ">=": lambda a, b, env: a(env) >= b(env)},
        {"+": lambda a, b, env: a(env) + b(env), "-": lambda a, b, env: a(env) - b(env)},
        {"*": lambda a, b, env: a(env) * b(env), "/": lambda a, b, env: a(env) / b(env),
         "%": lambda a, b, env: a(env) % b(env)},
    )

    def binary(self, level: int):
        if level == len(self.LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek(*self.LEVELS[level]):
            apply = self.LEVELS[level][self.tokens[self.i][1]]
            self.i += 1
            right, first = self.binary(level + 1), left
            left = lambda env, a=first, b=right, f=apply: f(a, b, env)  # noqa: E731
        return left

    def unary(self):
        if self.peek("!", "not"):
            self.i += 1
            operand = self.unary()
            return lambda env: not _truth(operand(env))
        if self.peek("-"):
            self.i += 1
            operand = self.unary()
            return lambda env: -operand(env)
        return self.postfix()

    def postfix(self):
        node = self.primary()
        while True:
            if self.peek("."):
                self.i += 1
                kind, name = self.tokens[self.i]
                if kind != "name":
                    raise HarnessError(f"expected a name after '.' in {self.text!r}")
                self.i += 1
                node = lambda env, n=node, key=name: _member(n(env), key)  # noqa: E731
            elif self.peek("["):
                self.i += 1
                index = self.ternary()
                self.take("]")
                node = lambda env, n=node, k=index: _member(n(env), k(env))  # noqa: E731
            elif self.peek("("):
                self.i += 1
                arguments = self.list_items(")")
                node = lambda env, f=node, a=arguments: f(env)(*(x(env) for x in a))  # noqa: E731
            else:
                return node

    def list_items(self, closing: str) -> list:
        items = []
        while not self.peek(closing):
            items.append(self.ternary())
            if not self.peek(closing):
                self.take(",")
        self.take(closing)
        return items

    def primary(self):
        kind, value = self.tokens[self.i]
        self.i += 1
        if kind in ("num", "str"):
            return lambda env: value
        if kind == "name":
            constants = {"true": True, "false": False, "nil": None}
            if value in constants:
                return lambda env: constants[value]
            return lambda env: _member(env, value)
        if value == "(":
            node = self.ternary()
            self.take(")")
            return node
        if value == "[":
            items = self.list_items("]")
            return lambda env: [x(env) for x in items]
        raise HarnessError(f"unexpected {value!r} in expression {self.text!r}")


def _truth(value: Any) -> bool:
    if not isinstance(value, bool):
        raise HarnessError(f"expected a boolean, got {value!r}")
    return value


def _member(obj: Any, key: Any) -> Any:
    if isinstance(obj, Mapping):
        if key not in obj:
            raise HarnessError(f"no {key!r} among {sorted(obj)}")
        return obj[key]
    if isinstance(obj, list) and isinstance(key, int):
        return obj[key]
    raise HarnessError(f"cannot take {key!r} of {obj!r}")


def go_json(value: Any) -> str:
    """JSON as Go's encoding/json writes it: compact, map keys sorted, integral floats without
    '.0', <>& escaped."""
    def plain(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer() and abs(v) < 1e21:
            return int(v)
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    text = json.dumps(plain(value), separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def jsonpath(document: str, path: str) -> Any:
    """The value at ``path`` (``$``, then ``.key``, ``['key']``, ``["key"]`` or ``[n]`` steps)."""
    value = json.loads(document)
    steps = re.findall(r"""\.([A-Za-z_][A-Za-z0-9_]*)|\[\s*'([^']*)'\s*\]|\[\s*"([^"]*)"\s*\]|\[(\d+)\]""", path[1:])
    if not path.startswith("$") or "".join(
            f".{a}" if a else f"['{b}']" if b else f'["{c}"]' if c else f"[{d}]" for a, b, c, d in steps) != path[1:]:
        raise HarnessError(f"unsupported JSONPath {path!r}")
    for name, single, double, index in steps:
        value = value[int(index)] if index else value[name or single or double]
    return value


FUNCTIONS: dict[str, Any] = {
    "jsonpath": jsonpath,
    "toJson": go_json,
    "fromJSON": json.loads,
    "concat": lambda *lists: [x for items in lists for x in items],
    "asInt": lambda v: int(v),
    "asFloat": lambda v: float(v),
    "string": lambda v: v if isinstance(v, str) else go_json(v),
    "sprig": {"sha256sum": lambda text: hashlib.sha256(text.encode()).hexdigest()},
}


def evaluate(expression: str, scope: Mapping[str, Any]) -> Any:
    """``expression`` (expr-lang) in ``scope`` (dotted names, as Argo's scope, nested as Argo's
    expand does) with Argo's functions."""
    env: dict[str, Any] = dict(FUNCTIONS)
    for dotted, value in scope.items():
        node = env
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise HarnessError(f"scope name {dotted!r} clashes with another")
        node[last] = value
    return _Parser(expression).parse()(env)


def substitute(text: str, scope: Mapping[str, Any]) -> str:
    """``text`` with every ``{{tag}}`` replaced: a name from ``scope``, or ``{{=expression}}``'s
    value (a string as is, anything else as JSON). An unknown name is an error."""
    out, pos = [], 0
    while True:
        start = text.find("{{", pos)
        if start < 0:
            return "".join(out) + text[pos:]
        end = text.find("}}", start + 2)
        if end < 0:
            raise HarnessError(f"unclosed tag in {text!r}")
        out.append(text[pos:start])
        tag = text[start + 2:end].strip()
        if tag.startswith("="):
            value = evaluate(tag[1:], scope)
            if value is None:
                raise HarnessError(f"expression {tag[1:]!r} gave nil")
            out.append(value if isinstance(value, str) else go_json(value))
        elif tag in scope:
            out.append(str(scope[tag]))
        else:
            raise HarnessError(f"cannot resolve {{{{{tag}}}}}")
        pos = end + 2


def when_holds(condition: str) -> bool:
    """Argo's ``when`` after substitution (govaluate; the forms the templates use)."""
    value = evaluate(condition, {})
    if not isinstance(value, bool):
        raise HarnessError(f"when {condition!r} is not a condition")
    return value


# ---------------------------------------------------------------- pods

@dataclass
class Pod:
    """One attempt of a container: what runs, with which environment, where."""

    image: str
    command: list[str]
    env: dict[str, str]
    working_dir: str | None
    volumes: dict[str, Path]  # mount path -> this attempt's folder
    timeout_s: int | None


class LocalPods:
    """Runs a pod's command as a process of this venv: volume mount paths map to the attempt's
    folders (in the command, the working folder and output paths), the code is this checkout's."""

    def __init__(self, node_env: Mapping[str, str] | None = None):
        self.node_env = dict(node_env or {})

    @staticmethod
    def host_path(pod: Pod, path: str) -> str:
        """Where ``path`` of the pod's filesystem is on this machine (a volume's folder)."""
        for mount, folder in pod.volumes.items():
            if path == mount or path.startswith(mount + "/"):
                return str(folder) + path[len(mount):]
        return path

    def run(self, pod: Pod) -> int:
        command = [self.host_path(pod, part) for part in pod.command]
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(REPO),
               "LANG": "C.UTF-8", "HOME": str(next(iter(pod.volumes.values()))), **self.node_env, **pod.env}
        cwd = self.host_path(pod, pod.working_dir) if pod.working_dir else None
        return subprocess.run(command, env=env, cwd=cwd, timeout=pod.timeout_s).returncode


class DockerPods(LocalPods):
    """Runs a pod in its image with Docker: volumes mounted at their paths, host networking (the
    embedded S3 on 127.0.0.1), the caller's uid, ``mounts`` (host folders at the same path, e.g.
    the sqlite MLflow store) too."""

    def __init__(self, mounts: list[Path] = (), node_env: Mapping[str, str] | None = None):
        super().__init__(node_env)
        self.mounts = list(mounts)

    def run(self, pod: Pod) -> int:
        docker = ["docker", "run", "--rm", "--network", "host", "--user", f"{os.getuid()}:{os.getgid()}",
                  "-e", "HOME=/tmp"]
        for key, value in {**self.node_env, **pod.env}.items():
            docker += ["-e", f"{key}={value}"]
        for mount, folder in pod.volumes.items():
            docker += ["-v", f"{folder}:{mount}"]
        for folder in self.mounts:
            docker += ["-v", f"{folder}:{folder}"]
        if pod.working_dir:
            docker += ["-w", pod.working_dir]
        docker += ["--entrypoint", pod.command[0], pod.image, *pod.command[1:]]
        return subprocess.run(docker, timeout=pod.timeout_s).returncode


# ---------------------------------------------------------------- the controller

@dataclass
class Node:
    name: str
    template: str
    phase: str = "Pending"  # Succeeded Failed Error Skipped Omitted
    message: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    memoized: bool = False  # served from the memoization cache
    attempts: int = 0


@dataclass
class WorkflowRun:
    name: str
    uid: str
    parameters: dict[str, str]
    status: str = "Running"
    nodes: dict[str, Node] = field(default_factory=dict)
    exit_node: Node | None = None

    def phases(self) -> dict[str, str]:
        return {name: node.phase for name, node in self.nodes.items()}

    def ran(self) -> list[str]:
        """The tasks whose container ran (not skipped, not served from the cache)."""
        return [name for name, node in self.nodes.items() if node.attempts]


class Controller:
    """Runs workflows from one WorkflowTemplate (a rendered dict). ``secrets``: name -> key -> value
    (the namespace's Secrets); ``caches``: ConfigMap name -> key -> outputs, kept between runs."""

    def __init__(self, template: Mapping[str, Any], *, secrets: Mapping[str, Mapping[str, str]], pods: LocalPods,
                 scratch: Path):
        if template.get("kind") != "WorkflowTemplate":
            raise HarnessError("expected a WorkflowTemplate")
        self.template, self.spec = template, template["spec"]
        self.templates = {t["name"]: t for t in self.spec["templates"]}
        self.secrets, self.pods, self.scratch = secrets, pods, Path(scratch)
        self.caches: dict[str, dict[str, dict[str, str]]] = {}

    def submit(self, parameters: Mapping[str, str] | None = None) -> WorkflowRun:
        """Run a workflow from the template with ``parameters`` (the others keep their defaults)."""
        declared = {p["name"]: p for p in self.spec.get("arguments", {}).get("parameters", [])}
        unknown = set(parameters or {}) - set(declared)
        if unknown:
            raise HarnessError(f"no such parameters: {sorted(unknown)}")
        values = {name: str((parameters or {}).get(name, p.get("value", ""))) for name, p in declared.items()}
        for name, p in declared.items():
            if p.get("enum") and values[name] not in p["enum"]:
                raise HarnessError(f"parameter {name}: {values[name]!r} is not one of {p['enum']}")
        uid = str(uuid.uuid4())
        run = WorkflowRun(name=f"{self.template['metadata']['name']}-{uid[:5]}", uid=uid, parameters=values)
        scope = {"workflow.name": run.name, "workflow.uid": uid, "workflow.namespace": "gpt2ops",
                 **{f"workflow.parameters.{k}": v for k, v in values.items()}}
        dag = self.templates[self.spec["entrypoint"]]["dag"]["tasks"]
        self._run_dag(run, dag, scope)
        failed = [n for n in run.nodes.values() if n.phase in ("Failed", "Error")]
        run.status = "Failed" if failed else "Succeeded"
        if self.spec.get("onExit"):
            failures = [{"displayName": n.name, "message": n.message, "templateName": n.template, "phase": n.phase,
                         "podName": f"{run.name}-{n.name}", "finishedAt": None} for n in failed]
            if failed:  # the DAG node fails too, as a child of it did
                failures.append({"displayName": run.name, "message": f"child '{failed[0].name}' failed",
                                 "templateName": self.spec["entrypoint"], "phase": "Failed",
                                 "podName": run.name, "finishedAt": None})
            exit_scope = {**scope, "workflow.status": run.status,
                          "workflow.failures": json.dumps(failures or None)}
            run.exit_node = self._run_template(Node(name="onExit", template=self.spec["onExit"]), {}, exit_scope)
        return run

    def _run_dag(self, run: WorkflowRun, tasks: list[dict], scope: dict[str, Any]) -> None:
        depends = {t["name"]: [d.strip() for d in t.get("depends", "").split("&&") if d.strip()] for t in tasks}
        for name, names in depends.items():
            if any(not re.fullmatch(r"[A-Za-z0-9-]+", d) for d in names):
                raise HarnessError(f"task {name}: depends {names} uses more than task names joined by &&")
        pending = list(tasks)
        while pending:
            ready = [t for t in pending if all(run.nodes.get(d) and run.nodes[d].phase != "Pending"
                                               for d in depends[t["name"]])]
            if not ready:
                raise HarnessError(f"tasks {[t['name'] for t in pending]} wait for tasks that never run")
            task = ready[0]
            pending.remove(task)
            node = run.nodes[task["name"]] = Node(name=task["name"], template=task["template"])
            if any(run.nodes[d].phase not in ("Succeeded", "Skipped") for d in depends[task["name"]]):
                node.phase = "Omitted"
                continue
            task_scope = dict(scope)
            for ancestor in self._ancestors(task["name"], depends):
                for key, value in run.nodes[ancestor].outputs.items():
                    task_scope[f"tasks.{ancestor}.outputs.parameters.{key}"] = value
                task_scope[f"tasks.{ancestor}.status"] = run.nodes[ancestor].phase
            if task.get("when") and not when_holds(substitute(task["when"], task_scope)):
                node.phase = "Skipped"
                continue
            arguments = {a["name"]: substitute(str(a.get("value", "")), task_scope)
                         for a in task.get("arguments", {}).get("parameters", [])}
            self._run_template(node, arguments, scope)

    @staticmethod
    def _ancestors(name: str, depends: Mapping[str, list[str]]) -> set[str]:
        found, todo = set(), list(depends[name])
        while todo:
            current = todo.pop()
            if current not in found:
                found.add(current)
                todo += depends[current]
        return found

    def _run_template(self, node: Node, arguments: Mapping[str, str], scope: Mapping[str, Any]) -> Node:
        template = self.templates[node.template]
        local = dict(scope)
        for parameter in template.get("inputs", {}).get("parameters", []):
            name = parameter["name"]
            if name in arguments:
                local[f"inputs.parameters.{name}"] = arguments[name]
            elif "value" in parameter or "default" in parameter:
                local[f"inputs.parameters.{name}"] = substitute(str(parameter.get("value", parameter.get("default"))),
                                                                scope)
            else:
                raise HarnessError(f"template {node.template}: input {name} not given")
        memoize = template.get("memoize")
        cache = key = None
        if memoize:
            key = substitute(memoize["key"], local)
            if not CACHE_KEY.match(key):
                raise HarnessError(f"template {node.template}: invalid cache key {key!r}")
            cache = self.caches.setdefault(memoize["cache"]["configMap"]["name"], {})
            if key in cache:
                node.outputs, node.memoized, node.phase = dict(cache[key]), True, "Succeeded"
                return node
        retry = template.get("retryStrategy") or {}
        limit = int(retry.get("limit", 0))
        while True:
            node.attempts += 1
            code, outputs, error = self._attempt(node, template, local)
            if code == 0 and error is None:
                node.phase, node.outputs = "Succeeded", outputs
                break
            node.phase, node.message = ("Error", error) if error else ("Failed", f"Error (exit code {code})")
            retry_scope = {"lastRetry.status": node.phase, "lastRetry.exitCode": str(code if code is not None else -1)}
            if node.attempts > limit or (retry.get("expression") and not evaluate(retry["expression"], retry_scope)):
                break
        if cache is not None and node.phase == "Succeeded":
            cache[key] = dict(node.outputs)
        return node

    def _attempt(self, node: Node, template: Mapping[str, Any], local: Mapping[str, Any]):
        """(exit code, outputs, error message of an Error node) of one attempt of a container template."""
        container = template["container"]
        if template.get("podSpecPatch"):
            json.loads(substitute(template["podSpecPatch"], local))  # must be valid JSON once substituted
        folder = Path(tempfile.mkdtemp(prefix=f"{node.name}-", dir=self.scratch))
        volumes = {}
        declared = {v["name"]: v for v in template.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            if mount["mountPath"] == "/dev/shm":  # the node's own serves
                continue
            if "emptyDir" not in declared[mount["name"]]:
                raise HarnessError(f"template {node.template}: only emptyDir volumes here")
            volumes[mount["mountPath"]] = folder / mount["name"]
            volumes[mount["mountPath"]].mkdir()
        env = {}
        for variable in container.get("env", []):
            if "value" in variable:
                env[variable["name"]] = substitute(variable["value"], local)
                continue
            ref = variable["valueFrom"]["secretKeyRef"]
            value = self.secrets.get(ref["name"], {}).get(ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                return None, {}, f"secret {ref['name']} has no key {ref['key']}"
            env[variable["name"]] = value
        command = [substitute(part, local) for part in container.get("command", []) + container.get("args", [])]
        pod = Pod(image=container["image"], command=command, env=env,
                  working_dir=container.get("workingDir"), volumes=volumes,
                  timeout_s=template.get("activeDeadlineSeconds"))
        code = self.pods.run(pod)
        if code != 0:
            return code, {}, None
        outputs = {}
        for parameter in template.get("outputs", {}).get("parameters", []):
            path = Path(self.pods.host_path(pod, parameter["valueFrom"]["path"]))
            if not path.exists():
                return code, {}, f"output parameter {parameter['name']}: {parameter['valueFrom']['path']} not found"
            outputs[parameter["name"]] = path.read_text()
        return code, outputs, None

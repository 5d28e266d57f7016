"""`gpt2ops argo render | submit | schedule`: the Argo rendering of the pipeline
(``pipelines.argo_workflow``) as YAML, a run of the installed WorkflowTemplate, and a CronWorkflow
that retrains from it on a schedule.

`submit` and `schedule` talk to an Argo server's REST API (through Hera's WorkflowsService), set up
as Argo's own CLI is, by flags or its environment:

| flag | variable | meaning |
|---|---|---|
| `--host` | `ARGO_SERVER` | `host:port` (or a URL) of the Argo server |
| | `ARGO_SECURE` | `true` (default): HTTPS to a `host:port`; `false`: plain HTTP |
| `--insecure_skip_verify` | `ARGO_INSECURE_SKIP_VERIFY` | `true`: do not verify the server's certificate |
| | `ARGO_BASE_HREF` | the path the server is served under behind a proxy (e.g. `/argo/`) |
| `--token` | `ARGO_TOKEN` | the bearer token (`Bearer ...` or the bare token; `argo auth token` prints one) |
| `--namespace` | `ARGO_NAMESPACE` | where the template is installed (default `gpt2ops`) |
| | `ARGO_HTTP1` | accepted; this client always speaks HTTP/1.1 REST (no gRPC) |

The run parameters are those of `gpt2ops pipeline submit` (the run form, ``PipelineParameters``),
checked here before anything is sent. An unreachable server, a rejected token, a missing template
or a bad parameter is one line naming it (``ArgoError``/``ConfigError``; exit 2).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gpt2core.errors import ConfigError, Gpt2opsError
from pipelines.cli import add_parameter_arguments, pipeline_arguments

MANIFEST_DIR = Path(__file__).resolve().parents[1] / "k8s" / "components" / "argo"
DEFAULT_NAMESPACE = "gpt2ops"  # the namespace k8s/overlays/argo installs into
CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly", "@every")


class ArgoError(Gpt2opsError):
    """The Argo server cannot be reached, refused the request, or lacks what it needs."""


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


# ---------------------------------------------------------------- flags

def add_argo_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.argo_workflow import CRON_NAME, DEFAULT_SCHEDULE, DEFAULT_TIMEZONE, TEMPLATE_NAME

    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("render", help="write the WorkflowTemplate and CronWorkflow YAML")
    p.add_argument("--output", default=str(MANIFEST_DIR), help=f"folder (default: {MANIFEST_DIR})")

    def server(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("Argo server (default: Argo's ARGO_* environment)")
        g.add_argument("--host", default=os.environ.get("ARGO_SERVER"),
                       help="host:port or URL of the Argo server (env ARGO_SERVER; ARGO_SECURE=false: plain HTTP)")
        g.add_argument("--namespace", default=os.environ.get("ARGO_NAMESPACE") or DEFAULT_NAMESPACE,
                       help=f"namespace of the template (env ARGO_NAMESPACE; default {DEFAULT_NAMESPACE})")
        g.add_argument("--token", default=os.environ.get("ARGO_TOKEN"), help="bearer token (env ARGO_TOKEN)")
        g.add_argument("--insecure_skip_verify", action="store_true", default=None,
                       help="do not verify the server's TLS certificate (env ARGO_INSECURE_SKIP_VERIFY)")
        g.add_argument("--template", default=TEMPLATE_NAME, help=f"WorkflowTemplate to run (default {TEMPLATE_NAME})")

    p = sub.add_parser("submit", help="run the WorkflowTemplate once")
    server(p)
    add_parameter_arguments(p)
    p.add_argument("--no_cache", action="store_true", help="rerun every stage (memoize=false)")
    p.add_argument("--generate_name", help="prefix of the workflow's name (default: the template's name + '-')")

    p = sub.add_parser("schedule", help="create a CronWorkflow that retrains from the template")
    server(p)
    add_parameter_arguments(p)
    p.add_argument("--cron", default=DEFAULT_SCHEDULE,
                   help=f'when to retrain: 5-field cron or @daily/@weekly/..., default "{DEFAULT_SCHEDULE}" '
                        f'(Sundays 03:00)')
    p.add_argument("--timezone", default=DEFAULT_TIMEZONE, help=f"of the schedule (default {DEFAULT_TIMEZONE})")
    p.add_argument("--name", default=CRON_NAME, help=f"CronWorkflow name (default {CRON_NAME})")


# ---------------------------------------------------------------- gpt2ops argo ...

def main_argo(args: argparse.Namespace) -> int:
    from hera.workflows import models as m

    from pipelines import argo_workflow

    if args.action == "render":
        for path in argo_workflow.render(args.output):
            print(path)
        return 0
    arguments = pipeline_arguments(args, here=False)  # a bad parameter fails here, before anything is sent
    if args.action == "schedule":
        check_schedule(args.cron, args.timezone)
    service, where = connect(args)
    _require_template(service, args.template, args.namespace, where)
    if args.action == "submit":
        parameters = [f"{k}={argo_workflow.parameter_text(v)}" for k, v in arguments.items()]
        if args.no_cache:
            parameters.append(f"{argo_workflow.MEMOIZE}=false")
        request = m.WorkflowSubmitRequest(
            resource_kind="WorkflowTemplate", resource_name=args.template,
            submit_options=m.SubmitOpts(parameters=parameters or None,
                                        generate_name=args.generate_name or f"{args.template}-"))
        made = _call(lambda: service.submit_workflow(request, namespace=args.namespace), where,
                     f"submit a workflow from WorkflowTemplate {args.template!r}", args.namespace)
        print(f"submitted workflow {made.metadata.name} (namespace {args.namespace}): "
              f"{where}workflows/{args.namespace}/{made.metadata.name}")
        return 0
    cron = argo_workflow.cron_workflow(schedule=args.cron, timezone=args.timezone, arguments=arguments,
                                       name=args.name)
    if args.template != argo_workflow.TEMPLATE_NAME:
        cron.workflow_template_ref = m.WorkflowTemplateRef(name=args.template)
    request = m.CreateCronWorkflowRequest(cron_workflow=cron.build())
    made = _call(lambda: service.create_cron_workflow(request, namespace=args.namespace), where,
                 f"create CronWorkflow {args.name!r}", args.namespace)
    print(f"created CronWorkflow {made.metadata.name} ({args.cron}, {args.timezone}; namespace {args.namespace}): "
          f"{where}cron-workflows/{args.namespace}/{made.metadata.name}")
    return 0


def check_schedule(cron: str, timezone: str) -> None:
    """ConfigError unless ``cron`` is a 5-field cron expression or a descriptor Argo takes and
    ``timezone`` an IANA time zone."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    fields = cron.split()
    if not (len(fields) == 5 or (fields and fields[0] in CRON_DESCRIPTORS)):
        raise ConfigError(f"--cron: expected 5 space-separated fields (minute hour day month weekday) or "
                          f"@daily/@weekly/..., got {cron!r}")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"--timezone: {timezone!r} is not a time zone (e.g. UTC, Europe/Berlin)") from None


def server_url(host: str) -> str:
    """The Argo server's base URL (ending in /): ``host:port`` over HTTPS unless ARGO_SECURE=false,
    a URL as given, under ARGO_BASE_HREF."""
    url = host if "://" in host else ("https://" if _env_flag("ARGO_SECURE", True) else "http://") + host
    base = os.environ.get("ARGO_BASE_HREF", "").strip("/")
    return url.rstrip("/") + "/" + (f"{base}/" if base else "")


def connect(args: argparse.Namespace):
    """(Hera WorkflowsService, the server's URL) from the flags and the ARGO_* environment."""
    from hera.workflows import WorkflowsService

    if not args.host:
        raise ConfigError("--host: no Argo server given (pass --host or set ARGO_SERVER, e.g. localhost:2746)")
    url = server_url(args.host)
    insecure = args.insecure_skip_verify or _env_flag("ARGO_INSECURE_SKIP_VERIFY", False)
    _env_flag("ARGO_HTTP1", True)  # checked, no effect: this client always speaks HTTP/1.1 REST
    return WorkflowsService(host=url, token=args.token or None, verify_ssl=not insecure,
                            namespace=args.namespace), url


def _require_template(service, name: str, namespace: str, where: str) -> None:
    _call(lambda: service.get_workflow_template(name, namespace=namespace), where,
          f"read WorkflowTemplate {name!r}", namespace,
          missing=f"no WorkflowTemplate {name!r} in namespace {namespace!r} at {where}: install it with "
                  f"`kubectl apply -k k8s/overlays/argo` (docs/argo.md), or pass --template/--namespace")


def _call(request, where: str, action: str, namespace: str, *, missing: str | None = None):
    """``request()``, its failures as one ArgoError line; ``missing``: the line for a 404."""
    import requests
    from hera.exceptions import AlreadyExists, BadRequest, Forbidden, HeraException, NotFound, Unauthorized

    try:
        return request()
    except requests.exceptions.SSLError as exc:
        raise ArgoError(f"cannot {action}: TLS with the Argo server at {where} failed ({_reason(exc)}); for a "
                        f"self-signed certificate set ARGO_INSECURE_SKIP_VERIFY=true, for plain HTTP "
                        f"ARGO_SECURE=false") from None
    except requests.exceptions.RequestException as exc:
        raise ArgoError(f"cannot reach the Argo server at {where} ({_reason(exc)}): is it running, and are "
                        f"--host/ARGO_SERVER and ARGO_SECURE right?") from None
    except Unauthorized as exc:
        raise ArgoError(f"the Argo server at {where} rejected the token ({_message(exc)}): pass a valid one "
                        f"with --token or ARGO_TOKEN (`argo auth token` prints one)") from None
    except Forbidden as exc:
        raise ArgoError(f"the Argo server at {where} does not let this token {action} in namespace "
                        f"{namespace!r} ({_message(exc)})") from None
    except NotFound as exc:
        raise ArgoError(missing or f"cannot {action} at {where}: {_message(exc)}") from None
    except AlreadyExists as exc:
        raise ArgoError(f"cannot {action} in namespace {namespace!r}: it already exists ({_message(exc)}); "
                        f"delete it first (`argo cron delete NAME`) or choose another --name") from None
    except BadRequest as exc:
        raise ArgoError(f"the Argo server at {where} refused to {action}: {_message(exc)}") from None
    except HeraException as exc:
        raise ArgoError(f"cannot {action} at {where}: {_message(exc)}") from None


def _reason(exc: Exception) -> str:
    """The telling part of a requests error (its text nests urllib3's several levels deep)."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "certificate verify failed",
                   "No route to host", "Temporary failure in name resolution", "wrong version number",
                   "Connection reset", "Remote end closed connection"):
        if marker in text:
            return marker
    return type(exc).__name__


def _message(exc: Exception) -> str:
    """Hera's 'Server returned status code N with message: `...`' as 'N: ...'."""
    text = str(exc)
    prefix = "Server returned status code "
    if text.startswith(prefix):
        code, _, rest = text[len(prefix):].partition(" with message: ")
        return f"{code}: {rest.strip('`')}"
    return text

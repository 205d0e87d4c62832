"""Run a step in the step image as its own Kubernetes pod: a KubernetesPodOperator subclass per step.

    from mnnpipe.airflow.pod import pod_operator_class

    MnnConvertPodOperator = pod_operator_class("convert")
    MnnConvertPodOperator(task_id="convert", spec={...}, namespace="ml", service_account_name="mnnpipe")

- Deferrable by default: while the pod runs, the task waits in the triggerer and holds no worker
  slot. The spec is templated like the in-process operator's, validated in full before a pod is
  created (a bad spec fails at once, without retries), and sent as `mnnpipe run STEP --spec-json`.
- Pod Security "restricted": every container (the step and the XCom sidecar) runs as non-root
  uid 10001 with no privilege escalation, ALL capabilities dropped and seccomp RuntimeDefault.
- The XCom sidecar image is pinned (XCOM_SIDECAR_IMAGE, or `xcom_sidecar_image=`), never the
  provider's floating `alpine`.
- `activeDeadlineSeconds` follows the step's own `timeout_s` plus a margin for fetching and
  publishing, so Kubernetes ends a pod that outlives its step.
- S3 credentials come from the Secrets named in `secret_env_from` (only names reach the pod
  spec); none for IRSA / workload identity, where the service account carries the role.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

from ..container import resolve_image, step_command
from ..errors import InputError, SpecError
from .common import DEFAULT_RESOURCES, POD_RESULT_PATH, PULL_POLICIES, _check_env, _check_resources, has_templates, operator_class_name, spec_dict, summary_line

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The XCom sidecar's image, pinned: the provider's default is the floating tag `alpine`.
XCOM_SIDECAR_IMAGE = "alpine:3.20.3"
#: The uid/gid the step image runs as (containers/Dockerfile).
STEP_UID = 10001
#: Added to the step's `timeout_s` for the pod's activeDeadlineSeconds: fetch, verify, publish.
DEADLINE_MARGIN_S = 600


def restricted_container_context() -> k8s.V1SecurityContext:
    """What Pod Security "restricted" asks of every container."""
    return k8s.V1SecurityContext(
        run_as_non_root=True,
        run_as_user=STEP_UID,
        allow_privilege_escalation=False,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def restricted_pod_context() -> k8s.V1PodSecurityContext:
    return k8s.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=STEP_UID,
        run_as_group=STEP_UID,
        fs_group=STEP_UID,
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def deadline_seconds(spec: Any) -> int | None:
    """The pod's activeDeadlineSeconds: the step's `timeout_s` plus DEADLINE_MARGIN_S (None when
    the step has no time limit of its own)."""
    timeout = getattr(spec, "timeout_s", None)
    return None if timeout is None else int(math.ceil(timeout)) + DEADLINE_MARGIN_S


class MnnStepPodOperator(KubernetesPodOperator):
    """Run one mnnpipe step in its own pod; subclasses (one per step, `pod_operator_class`) set `step`.

    :param spec: the step's Spec, or a dict of its fields; Jinja templates allowed in strings.
    :param use_cache: serve an identical earlier run's published output instead of recomputing.
    :param image: step image (default: $MNNPIPE_IMAGE, else the package's tag).
    :param container_resources: {"requests": {...}, "limits": {...}} of the step's container.
    :param env_vars: non-secret environment of the step (e.g. MNNPIPE_S3_ENDPOINT_URL as the POD
        must reach it); names that look like credentials are refused.
    :param secret_env_from: Secrets whose keys become the step's environment (S3 credentials);
        empty for IRSA / workload identity.
    :param xcom_sidecar_image: the pinned image of the XCom sidecar.
    Every other argument (namespace, service_account_name, image_pull_policy, deferrable,
    node_selector, tolerations, ...) is KubernetesPodOperator's.
    """

    step: ClassVar[str] = ""
    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "spec")
    template_fields_renderers: ClassVar[dict[str, str]] = {**KubernetesPodOperator.template_fields_renderers, "spec": "json"}

    def __init__(
        self,
        *,
        spec: Any,
        use_cache: bool = True,
        image: str | None = None,
        container_resources: Mapping[str, Mapping[str, str]] | None = None,
        env_vars: Mapping[str, str] | None = None,
        secret_env_from: Sequence[str] = (),
        xcom_sidecar_image: str = XCOM_SIDECAR_IMAGE,
        image_pull_policy: str = "IfNotPresent",
        deferrable: bool = True,
        **kwargs: Any,
    ) -> None:
        if not self.step:
            raise TypeError("MnnStepPodOperator is a base class; use pod_operator_class(step)")
        if image_pull_policy not in PULL_POLICIES:
            raise SpecError(f"image_pull_policy: expected one of {', '.join(PULL_POLICIES)}, got '{image_pull_policy}'")
        env = _check_env(env_vars or {})
        resources = _check_resources(DEFAULT_RESOURCES if container_resources is None else container_resources)
        kwargs.setdefault("name", f"mnnpipe-{self.step}")
        kwargs.setdefault("labels", {"app.kubernetes.io/name": "mnnpipe", "mnnpipe.step": self.step})
        super().__init__(
            image=resolve_image(image),
            cmds=["mnnpipe"],
            arguments=[],  # set from the rendered, validated spec in execute()
            env_vars=[k8s.V1EnvVar(name=k, value=v) for k, v in sorted(env.items())],
            env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=s)) for s in secret_env_from if s],
            container_resources=k8s.V1ResourceRequirements(**resources),
            container_security_context=restricted_container_context(),
            security_context=restricted_pod_context(),
            image_pull_policy=image_pull_policy,
            do_xcom_push=True,
            get_logs=True,
            on_finish_action="delete_pod",
            deferrable=deferrable,
            **kwargs,
        )
        self.spec = spec_dict(self.step, spec)
        self.use_cache = use_cache
        self.xcom_sidecar_image = xcom_sidecar_image

    def prepare(self) -> Any:
        """Validate the rendered spec and set the pod's command and deadline from it."""
        from ..runner import parse_spec

        if has_templates(self.spec):
            raise SpecError(f"spec of task '{self.task_id}' still holds unrendered templates")
        spec = parse_spec(self.step, self.spec)
        self.arguments = step_command(self.step, spec.model_dump_json(), result_path=POD_RESULT_PATH, use_cache=self.use_cache)[1:]
        self.active_deadline_seconds = deadline_seconds(spec)
        return spec

    def build_pod_request_obj(self, context: Context | None = None) -> k8s.V1Pod:
        pod = super().build_pod_request_obj(context)
        for container in pod.spec.containers:  # the sidecar too: "restricted" applies to every container
            container.security_context = restricted_container_context()
            if container.name == "airflow-xcom-sidecar":
                container.image = self.xcom_sidecar_image
        return pod

    def execute(self, context: Context) -> Any:
        from airflow.sdk.exceptions import AirflowFailException

        try:
            self.prepare()
        except (SpecError, InputError) as e:
            raise AirflowFailException(f"{self.step}: {e}") from e  # wrong on every retry too
        result = super().execute(context)
        if result is not None:  # not deferred: the pod is done
            self._log_summary(result)
        return result

    def trigger_reentry(self, context: Context, event: dict[str, Any]) -> Any:
        """Back from the triggerer (deferrable mode): the pod is done; its result is the XCom."""
        result = super().trigger_reentry(context, event)
        if result is not None:
            self._log_summary(result)
        return result

    def _log_summary(self, raw: Any) -> None:
        from .. import catalog

        try:
            result = catalog.get(self.step).result.model_validate(raw)
        except ValueError:
            self.log.warning("%s: the pod's result is not a %s Result: %s", self.step, self.step, str(raw)[:500])
            return
        self.log.info("%s", summary_line(self.step, result))


_CLASSES: dict[str, type[MnnStepPodOperator]] = {}


def pod_operator_class(step: str) -> type[MnnStepPodOperator]:
    """The pod operator class of `step` (e.g. MnnConvertPodOperator), made once."""
    from .. import catalog

    if step not in _CLASSES:
        catalog.get(step)  # unknown steps fail here, with the list of known ones
        name = operator_class_name(step).replace("Operator", "PodOperator")
        _CLASSES[step] = type(name, (MnnStepPodOperator,), {"step": step, "__module__": __name__, "__qualname__": name})
    return _CLASSES[step]

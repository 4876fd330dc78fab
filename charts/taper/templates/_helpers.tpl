{{/*
Names and labels shared by every template of the chart.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "taper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's base name: fullnameOverride, else the release name when it already contains
the chart name, else "<release>-<chart>". Truncated to leave room for suffixes.
*/}}
{{- define "taper.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of the operator's Deployment, Service and (namespaced or cluster) Roles. */}}
{{- define "taper.operator.fullname" -}}
{{- printf "%s-operator" (include "taper.fullname" .) }}
{{- end }}

{{/* "chart-version" for the helm.sh/chart label. */}}
{{- define "taper.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator's pods (stable across upgrades). */}}
{{- define "taper.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "taper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels on every object of the operator. */}}
{{- define "taper.operator.labels" -}}
helm.sh/chart: {{ include "taper.chart" . }}
{{ include "taper.operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The operator's ServiceAccount: serviceAccount.name, else the operator's full name. */}}
{{- define "taper.operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "taper.operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository:tag" with the tag defaulting to the chart's appVersion. */}}
{{- define "taper.image" -}}
{{- printf "%s:%s" .repository (default .appVersion .tag) }}
{{- end }}

{{/*
"true" when leaderElection.enabled is true, or when it is unset (null) and replicas > 1;
"false" otherwise.
*/}}
{{- define "taper.leaderElection" -}}
{{- $le := .Values.leaderElection | default dict }}
{{- $enabled := $le.enabled }}
{{- if kindIs "bool" $enabled }}
{{- ternary "true" "false" $enabled }}
{{- else }}
{{- ternary "true" "false" (gt (int .Values.replicas) 1) }}
{{- end }}
{{- end }}

{{/*
The operator's permissions in the namespaces it watches: exactly the verbs it uses, and
nothing on Secrets (trainer pods get their storage credentials from a Secret in their own
namespace through envFrom; the operator only writes the Secret's name).
*/}}
{{- define "taper.operator.rules" -}}
# The three Taper kinds: read and watch them; patch their metadata (the finalizer).
- apiGroups: ["taper.dev"]
  resources: ["datasets", "pretrainjobs", "finetunejobs"]
  verbs: ["get", "list", "watch", "patch"]
# Their status subresource: phase, conditions and live figures.
- apiGroups: ["taper.dev"]
  resources: ["datasets/status", "pretrainjobs/status", "finetunejobs/status"]
  verbs: ["get", "patch"]
# Owner references with blockOwnerDeletion on the objects built for a resource (needed
# where the OwnerReferencesPermissionEnforcement admission plugin is on).
- apiGroups: ["taper.dev"]
  resources: ["datasets/finalizers", "pretrainjobs/finalizers", "finetunejobs/finalizers"]
  verbs: ["update"]
# The trainer Jobs and the storage cleanup Jobs.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Each job's resolved-spec ConfigMap and its own ServiceAccount.
- apiGroups: [""]
  resources: ["configmaps", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Trainer pods: exit codes and conditions for the failure classifier.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Events on the Taper resources (both APIs).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Per job: a Role allowing get and patch on that one resource's status (by resourceNames),
# bound to the job's ServiceAccount. The operator may grant it because it holds those
# permissions itself, so neither `escalate` nor `bind` is needed.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- end }}

{{/* Namespaces of the trainer pods to scrape: monitoring.trainerNamespaces, else
watchNamespaces; empty: all. */}}
{{- define "taper.trainerNamespaces" -}}
{{- $ns := .Values.monitoring.trainerNamespaces | default .Values.watchNamespaces | default list }}
{{- toJson $ns }}
{{- end }}

{{/* The job label of the operator's series: the metrics Service's name, as a ServiceMonitor
sets it, and the job_name of the plain scrape configuration. */}}
{{- define "taper.operator.metricsJob" -}}
{{- printf "%s-metrics" (include "taper.operator.fullname" .) }}
{{- end }}

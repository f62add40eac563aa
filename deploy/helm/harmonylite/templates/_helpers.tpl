{{/* Names. */}}
{{- define "harmonylite.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "harmonylite.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "harmonylite.headless" -}}
{{- printf "%s-peers" (include "harmonylite.fullname" .) -}}
{{- end -}}

{{- define "harmonylite.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "harmonylite.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "harmonylite.selectorLabels" -}}
app.kubernetes.io/name: {{ include "harmonylite.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "harmonylite.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "harmonylite.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "harmonylite.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* JetStream stream replicas: the value, or min(3, replicaCount). */}}
{{- define "harmonylite.streamReplicas" -}}
{{- if gt (int .Values.harmonylite.streamReplicas) 0 -}}
{{- .Values.harmonylite.streamReplicas -}}
{{- else -}}
{{- min 3 (int .Values.replicaCount) -}}
{{- end -}}
{{- end -}}

{{- define "harmonylite.minPeers" -}}
{{- if ge (int .Values.harmonylite.clusterMinPeers) 0 -}}
{{- .Values.harmonylite.clusterMinPeers -}}
{{- else -}}
{{- sub (int .Values.replicaCount) 1 -}}
{{- end -}}
{{- end -}}

{{/* Pods that may be down while a JetStream majority stays up. */}}
{{- define "harmonylite.maxUnavailable" -}}
{{- $n := int .Values.replicaCount -}}
{{- sub $n (add (div $n 2) 1) -}}
{{- end -}}

{{- define "harmonylite.terminationGrace" -}}
{{- if gt (int .Values.terminationGracePeriodSeconds) 0 -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add (int .Values.preStopSleepSeconds) (int .Values.harmonylite.shutdownGrace) 15 -}}
{{- end -}}
{{- end -}}

{{- define "harmonylite.natsSecretName" -}}
{{- default (printf "%s-nats" (include "harmonylite.fullname" .)) .Values.nats.auth.existingSecret -}}
{{- end -}}

{{/* The route TLS Secret: the one named, else the generated one; empty when TLS is off. */}}
{{- define "harmonylite.tlsSecretName" -}}
{{- if .Values.nats.tls.enabled -}}
{{- default (printf "%s-nats-tls" (include "harmonylite.fullname" .)) .Values.nats.tls.secretName -}}
{{- end -}}
{{- end -}}

{{- define "harmonylite.s3SecretName" -}}
{{- default (printf "%s-s3" (include "harmonylite.fullname" .)) .Values.snapshot.s3.existingSecret -}}
{{- end -}}

{{/* Snapshots are configured: enabled, and for s3 a bucket is named. */}}
{{- define "harmonylite.snapshotActive" -}}
{{- if and .Values.snapshot.enabled (or (ne .Values.snapshot.store "s3") .Values.snapshot.s3.bucket) -}}
true
{{- end -}}
{{- end -}}

{{- define "harmonylite.s3Credentials" -}}
{{- or .Values.snapshot.s3.existingSecret .Values.snapshot.s3.accessKeyId -}}
{{- end -}}

{{/* The harmonylite configuration file (docs/configuration.md). */}}
{{- define "harmonylite.config" -}}
{{- $mount := .Values.database.mountPath -}}
{{- /* A short name: the pod's DNS search path adds its namespace, so the same
       manifests work in any namespace (kustomize overlays move them). */ -}}
{{- $srv := printf "dns+srv://_cluster._tcp.%s" (include "harmonylite.headless" .) -}}
{{- $cfg := dict
  "db_path" .Values.database.path
  "data_dir" (printf "%s/harmonylite" $mount)
  "shutdown_grace" (int .Values.harmonylite.shutdownGrace)
  "logging" (dict "level" .Values.harmonylite.logLevel "format" .Values.harmonylite.logFormat)
  "http" (dict "bind" (printf "0.0.0.0:%d" (int .Values.harmonylite.httpPort)))
  "replication_log" (dict "replicas" (int (include "harmonylite.streamReplicas" .)))
  "nats" (dict
    "bind_address" (printf "127.0.0.1:%d" (int .Values.nats.clientPort))
    "cluster_addr" (printf "0.0.0.0:%d" (int .Values.nats.clusterPort))
    "cluster_peers" (list $srv)
    "cluster_min_peers" (int (include "harmonylite.minPeers" .))
    "discovery_interval" (int .Values.harmonylite.discoveryInterval)
    "server_bin" "nats-server")
-}}
{{- if .Values.nats.auth.enabled -}}
{{- $_ := set $cfg.nats "user_name" "harmonylite" -}}
{{- end -}}
{{- if include "harmonylite.tlsSecretName" . -}}
{{- $_ := set $cfg.nats "server_cert_file" "/etc/harmonylite/tls/tls.crt" -}}
{{- $_ := set $cfg.nats "server_key_file" "/etc/harmonylite/tls/tls.key" -}}
{{- $_ := set $cfg.nats "server_ca_file" "/etc/harmonylite/tls/ca.crt" -}}
{{- if .Values.nats.tls.clientPort -}}
{{- $_ := set $cfg.nats "client_tls" "verify" -}}
{{- end -}}
{{- end -}}
{{- if include "harmonylite.snapshotActive" . -}}
{{- $snap := dict "store" .Values.snapshot.store "keep" (int .Values.snapshot.keep) -}}
{{- if eq .Values.snapshot.store "s3" -}}
{{- $_ := set $snap "s3_endpoint" .Values.snapshot.s3.endpoint -}}
{{- $_ := set $snap "s3_region" .Values.snapshot.s3.region -}}
{{- $_ := set $snap "s3_bucket" .Values.snapshot.s3.bucket -}}
{{- $_ := set $snap "s3_prefix" .Values.snapshot.s3.prefix -}}
{{- $_ := set $snap "s3_path_style" .Values.snapshot.s3.pathStyle -}}
{{- else if eq .Values.snapshot.store "dir" -}}
{{- $_ := set $snap "dir" .Values.snapshot.dir -}}
{{- end -}}
{{- $_ := set $cfg "snapshot" $snap -}}
{{- end -}}
{{- toYaml (mustMergeOverwrite $cfg (deepCopy .Values.harmonylite.config)) -}}
{{- end -}}

{{/* harmonylite's NATS secrets (sidecar and restore: one configuration). */}}
{{- define "harmonylite.natsEnv" -}}
{{- if .Values.nats.auth.enabled }}
- name: HARMONYLITE_NATS_USER_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "harmonylite.natsSecretName" . }}
      key: user-password
- name: HARMONYLITE_NATS_CLUSTER_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "harmonylite.natsSecretName" . }}
      key: cluster-password
{{- end }}
{{- end -}}

{{/* Environment shared by the sidecar and the restore init container. */}}
{{- define "harmonylite.env" -}}
{{- if and (include "harmonylite.snapshotActive" .) (eq .Values.snapshot.store "s3") (include "harmonylite.s3Credentials" .) }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "harmonylite.s3SecretName" . }}
      key: {{ .Values.snapshot.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "harmonylite.s3SecretName" . }}
      key: {{ .Values.snapshot.s3.secretAccessKeyKey }}
{{- end }}

{{- with .Values.harmonylite.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

"""Running elsewhere: Ray jobs (with vis4mer as a wheel), KubeRay manifests, cloud-launcher configs."""

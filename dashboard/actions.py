"""Engineer actions: create experiments, run their lifecycle, change weights, ship, move aliases;
and the admin's user management. Every route here changes something, so every one is POST-only
for the change (CSRF-protected) and refused to viewers by the gate in auth.py."""

from __future__ import annotations

from typing import Any

from abrec.dashboard.app import db
from abrec.dashboard.auth import requires
from abrec.experiments import identity, models_admin, service
from abrec.experiments.schema import ROLES
from abrec.models import registry
from flask import Blueprint, flash, g, redirect, render_template, request, url_for
from flask_wtf import FlaskForm
from wtforms import (
    BooleanField,
    FieldList,
    FloatField,
    FormField,
    IntegerField,
    PasswordField,
    SelectField,
    StringField,
    TextAreaField,
)
from wtforms import Form as PlainForm
from wtforms.validators import DataRequired, Length, NumberRange, Optional

bp = Blueprint("actions", __name__)

REFUSALS = (service.ExperimentError, identity.IdentityError, registry.RegistryError)


class ArmForm(PlainForm):
    name = StringField("Arm name", validators=[Optional(), Length(max=64)])
    weight = FloatField("Weight", validators=[Optional(), NumberRange(min=0)], default=1.0)
    model_alias = SelectField("Registry alias", validate_choice=False)


class NewExperimentForm(FlaskForm):
    key = StringField("Key (lowercase, e.g. tron-vs-sasrec)", validators=[DataRequired(), Length(max=100)])
    name = StringField("Name", validators=[Optional(), Length(max=200)])
    hypothesis = TextAreaField("Hypothesis", validators=[Optional(), Length(max=2000)])
    arms = FieldList(FormField(ArmForm), min_entries=3, max_entries=8)
    planned_users = IntegerField("Planned users (all arms)", validators=[Optional(), NumberRange(min=1)])
    target_effect = FloatField("Minimum detectable lift (e.g. 0.05 = +5%)", validators=[Optional(),
                               NumberRange(min=0.0001)])
    min_runtime_days = IntegerField("Minimum runtime (days)", default=7, validators=[NumberRange(min=0)])
    timezone = StringField("Timezone", default="UTC", validators=[DataRequired(), Length(max=64)])


class ShipForm(FlaskForm):
    arm = SelectField("Arm to ship", validate_choice=False)


class WeightsForm(FlaskForm):
    weights = FieldList(FloatField(validators=[DataRequired(), NumberRange(min=0)]))
    confirm = BooleanField("I understand: this starts a new phase and re-randomises every user")


class MoveAliasForm(FlaskForm):
    alias = StringField("Alias (model@alias)", validators=[DataRequired(), Length(max=200)])
    version = SelectField("Version", validate_choice=False)
    reason = StringField("Reason", validators=[Optional(), Length(max=500)])
    confirm = BooleanField("Yes, change the treatment of the live experiments listed above")


class RoleForm(FlaskForm):
    role = SelectField("Role", choices=list(ROLES))


class NewUserForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password (8+ characters)", validators=[DataRequired(), Length(max=256)])
    role = SelectField("Role", choices=list(ROLES), default="viewer")


def _actor() -> str:
    return g.user.username


def _alias_choices() -> list[str]:
    return [a.ref for a in registry.list_aliases(db())]


def _commit_or_flash(change, success: str) -> bool:
    """Run `change()` in the request's transaction; a refusal rolls back and is shown to the user."""
    session = db()
    try:
        change()
        session.commit()
    except REFUSALS as exc:
        session.rollback()
        flash(str(exc), "error")
        return False
    flash(success, "success")
    return True


@bp.route("/experiments/new", methods=["GET", "POST"])
@requires("editor")
def new_experiment() -> Any:
    form = NewExperimentForm()
    choices = _alias_choices()
    for entry in form.arms:
        entry.form.model_alias.choices = choices
    if request.method == "GET":
        for entry, name in zip(form.arms, ("control", "treatment", ""), strict=False):
            entry.form.name.data = name
    if form.validate_on_submit():
        arms = [
            service.ArmSpec(a.form.name.data.strip(), a.form.weight.data or 0.0,
                            a.form.model_alias.data or "")
            for a in form.arms
            if (a.form.name.data or "").strip()
        ]

        def change() -> None:
            service.create_experiment(
                db(), key=form.key.data.strip(), arms=arms, actor=_actor(), name=form.name.data or "",
                hypothesis=form.hypothesis.data or "", planned_users=form.planned_users.data,
                target_effect=form.target_effect.data, min_runtime_days=form.min_runtime_days.data,
                timezone=form.timezone.data.strip(),
            )

        if _commit_or_flash(change, f"Experiment {form.key.data} created as a draft. Start it when ready."):
            return redirect(url_for("pages.experiment", key=form.key.data.strip()))
    status = 400 if request.method == "POST" else 200
    return render_template("new_experiment.html", nav="experiments", form=form,
                           has_aliases=bool(choices)), status


LIFECYCLE = {
    "start": (service.start, "started: users are being assigned"),
    "pause": (service.pause, "paused: everyone gets the control arm, nothing is analysed"),
    "resume": (service.resume, "resumed in the same phase"),
    "stop": (service.stop, "stopped: the control arm serves everyone"),
}


@bp.post("/experiments/<key>/<any(start, pause, resume, stop):action>")
@requires("editor")
def lifecycle(key: str, action: str) -> Any:
    run, outcome = LIFECYCLE[action]
    _commit_or_flash(lambda: run(db(), key, _actor()), f"{key} {outcome}.")
    return redirect(url_for("pages.experiment", key=key))


@bp.post("/experiments/<key>/ship")
@requires("editor")
def ship(key: str) -> Any:
    form = ShipForm()
    if form.validate_on_submit():
        arm = form.arm.data
        _commit_or_flash(lambda: service.ship(db(), key, arm, _actor()), f"{key}: {arm} shipped to everyone.")
    return redirect(url_for("pages.experiment", key=key))


@bp.route("/experiments/<key>/weights", methods=["GET", "POST"])
@requires("editor")
def change_weights(key: str) -> Any:
    experiment = service.get_experiment(db(), key)
    form = WeightsForm()
    if request.method == "GET":
        for arm in experiment.arms:
            form.weights.append_entry(round(arm.weight, 4))
    if form.validate_on_submit():
        if len(form.weights.data) != len(experiment.arms):
            flash("Give one weight per arm.", "error")
        elif experiment.status in service.LIVE and not form.confirm.data:
            flash("Tick the confirmation: changing weights starts a new phase and re-randomises users.",
                  "error")
        else:
            weights = {a.name: w for a, w in zip(experiment.arms, form.weights.data, strict=True)}
            done = _commit_or_flash(
                lambda: service.change_weights(db(), key, weights, _actor(), reseed=True),
                "Weights changed." + (" A new phase started; users were re-randomised."
                                      if experiment.status in service.LIVE else ""),
            )
            if done:
                return redirect(url_for("pages.experiment", key=key))
    status = 400 if request.method == "POST" else 200
    return render_template("weights.html", nav="experiments", form=form, experiment=experiment,
                           live=experiment.status in service.LIVE), status


@bp.route("/registry/move-alias", methods=["GET", "POST"])
@requires("editor")
def move_alias() -> Any:
    session = db()
    form = MoveAliasForm(alias=request.args.get("alias"))
    form.version.choices = [v.label for v in reversed(registry.list_versions(session))]
    live: list[str] = []
    if form.validate_on_submit():
        try:
            outcome = models_admin.move_alias(session, form.alias.data.strip(), form.version.data,
                                              actor=_actor(), confirm=form.confirm.data,
                                              reason=form.reason.data or "")
            session.commit()
        except models_admin.ConfirmationRequired as exc:
            session.rollback()
            live = exc.experiments
        except REFUSALS as exc:
            session.rollback()
            flash(str(exc), "error")
        else:
            message = f"{outcome.move.alias} now points to {outcome.move.to_version}."
            if outcome.new_phases:
                phases = ", ".join(f"{k} (phase {n})" for k, n in outcome.new_phases.items())
                message += f" New phases: {phases}."
            if not outcome.move.changed:
                message = f"{outcome.move.alias} already pointed to {outcome.move.to_version}."
            flash(message, "success")
            return redirect(url_for("pages.registry"))
    status = 400 if request.method == "POST" else 200
    return render_template("move_alias.html", nav="registry", form=form, live=live,
                           aliases=registry.list_aliases(session)), status


@bp.route("/users", methods=["GET", "POST"])
@requires("admin")
def users() -> Any:
    form = NewUserForm()
    if form.validate_on_submit():
        username, password, role = form.username.data.strip(), form.password.data, form.role.data
        if _commit_or_flash(lambda: identity.create_user(db(), username, password, role, _actor()),
                            f"User {username} created ({role})."):
            return redirect(url_for("actions.users"))
    status = 400 if request.method == "POST" else 200
    return render_template("users.html", nav="users", form=form, users=identity.list_users(db()),
                           roles=ROLES), status


@bp.post("/users/<username>/role")
@requires("admin")
def set_role(username: str) -> Any:
    form = RoleForm()
    if username == g.user.username:
        flash("You cannot change your own role: ask another admin.", "error")
    elif form.validate_on_submit():
        role = form.role.data
        _commit_or_flash(lambda: identity.set_role(db(), username, role, _actor()),
                         f"{username} is now {role}.")
    return redirect(url_for("actions.users"))

# ruff: noqa: E501 -- the CSDL below keeps DMTF's one-element-a-line layout
"""The emulator's one OEM extension, and its CSDL.

A ResourceBlock the emulator composes carries `Oem.Cohdi` with the PCI address the GPU got on the
machine it is attached to. The standard has no place for it: `PCIeFunction`'s segment, bus, device
and function numbers "shall not be present if the PCIe device function is fabric-attached", yet
the node role needs the address to find the GPU that arrived. Every other fact (model, vendor,
memory, serial, UUID, zone, composition state, failure message) is in its standard place.

The CSDL below is the schema of that object (DSP0266 "OEM extensions": an OEM object carries an
`@odata.type` whose schema the service publishes). The emulator serves it at `SCHEMA_URI` and
references it from `$metadata`; DMTF's service validator reads it from its schema directory.
"""

from __future__ import annotations

NAMESPACE = "CohdiResourceBlock"
VERSION = "v1_0_0"
#: The `@odata.type` of `ResourceBlock.Oem.Cohdi`.
ODATA_TYPE = f"#{NAMESPACE}.{VERSION}.{NAMESPACE}"
#: The CSDL file's name (as DMTF names schema files) and where the emulator serves it.
SCHEMA_FILE = f"{NAMESPACE}_v1.xml"
SCHEMA_URI = f"/redfish/v1/Schemas/{SCHEMA_FILE}"

CSDL = f"""<?xml version="1.0" encoding="UTF-8"?>
<edmx:Edmx xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx" Version="4.0">
  <edmx:Reference Uri="http://docs.oasis-open.org/odata/odata/v4.0/errata03/csd01/complete/vocabularies/Org.OData.Core.V1.xml">
    <edmx:Include Namespace="Org.OData.Core.V1" Alias="OData"/>
  </edmx:Reference>
  <edmx:Reference Uri="http://redfish.dmtf.org/schemas/v1/RedfishExtensions_v1.xml">
    <edmx:Include Namespace="RedfishExtensions.v1_0_0" Alias="Redfish"/>
    <edmx:Include Namespace="Validation.v1_0_0" Alias="Validation"/>
  </edmx:Reference>
  <edmx:Reference Uri="http://redfish.dmtf.org/schemas/v1/Resource_v1.xml">
    <edmx:Include Namespace="Resource"/>
    <edmx:Include Namespace="Resource.v1_0_0"/>
  </edmx:Reference>
  <edmx:DataServices>
    <Schema xmlns="http://docs.oasis-open.org/odata/ns/edm" Namespace="{NAMESPACE}">
      <Annotation Term="Redfish.OwningEntity" String="cohdi-agent"/>
    </Schema>
    <Schema xmlns="http://docs.oasis-open.org/odata/ns/edm" Namespace="{NAMESPACE}.{VERSION}">
      <Annotation Term="Redfish.OwningEntity" String="cohdi-agent"/>
      <ComplexType Name="{NAMESPACE}" BaseType="Resource.OemObject">
        <Annotation Term="OData.AdditionalProperties" Bool="false"/>
        <Annotation Term="OData.Description" String="The cohdi-agent fabric emulator's extension of a resource block."/>
        <Annotation Term="OData.LongDescription" String="This object shall contain what a composed block's host needs and the standard does not carry."/>
        <Property Name="PciAddress" Type="Edm.String">
          <Annotation Term="OData.Permissions" EnumMember="OData.Permission/Read"/>
          <Annotation Term="OData.Description" String="The PCI address of the device on the system it is composed to."/>
          <Annotation Term="OData.LongDescription" String="This property shall contain the PCI address (domain:bus:device.function) the device has on the system in Links.ComputerSystems, or null while it is composed to none."/>
          <Annotation Term="Validation.Pattern" String="^[0-9a-f]{{4}}:[0-9a-f]{{2}}:[0-9a-f]{{2}}\\.[0-7]$"/>
        </Property>
      </ComplexType>
    </Schema>
  </edmx:DataServices>
</edmx:Edmx>
"""
